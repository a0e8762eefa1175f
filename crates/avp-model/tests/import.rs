//! Parity of the importers with onnxruntime on the committed fixtures
//! (`tests/fixtures/onnx`, made by `make_fixtures.py` there), and clear
//! errors for every kind of bad file.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};

use avp_model::onnx::proto::{ModelProto, TensorProto};
use avp_model::{
    Backbone, BatchNormUse, BlockKind, Kernels, LoadOptions, ModelError, StridePlacement,
    WeightFormat, load_weights, npy, onnx::import_resnet_bytes, parse_device, save_native,
};
use burn::tensor::{Device, Tensor, TensorData};
use prost::Message;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/onnx")
}

fn meta() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("fixtures.json")).expect("fixtures.json");
    serde_json::from_str(&text).expect("fixtures.json parses")
}

/// max |ours - reference| / max(1, |reference|)
fn rel_err(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len(), "output sizes differ");
    ours.iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f32::max)
}

fn run(model: &avp_model::ResNet, input: &Path, device: &Device) -> Vec<f32> {
    let (shape, values) = npy::read_f32(input).expect("input npy");
    let x = Tensor::<4>::from_data(TensorData::new(values, shape), device);
    model
        .forward(x)
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 output")
}

fn run_backbone(backbone: &Backbone, bn: BatchNormUse, input: &Path, device: &Device) -> Vec<f32> {
    let (shape, values) = npy::read_f32(input).expect("input npy");
    let x = Tensor::<4>::from_data(TensorData::new(values, shape), device);
    backbone
        .forward(x, bn)
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 output")
}

#[test]
fn every_fixture_imports_with_the_built_architecture_and_matches_onnxruntime() {
    let device = parse_device("flex").unwrap();
    let meta = meta();
    let fixtures_meta = meta.as_object().unwrap();
    assert!(fixtures_meta.len() >= 6);
    for (name, m) in fixtures_meta {
        let path = fixtures().join(format!("{name}.onnx"));
        let loaded = load_weights(&path, &device, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let c = &loaded.config;
        let kind = if m["kind"] == "basic" {
            BlockKind::Basic
        } else {
            BlockKind::Bottleneck
        };
        assert_eq!(c.block, kind, "{name}");
        let layers: Vec<usize> = serde_json::from_value(m["layers"].clone()).unwrap();
        let widths: Vec<usize> = serde_json::from_value(m["widths"].clone()).unwrap();
        assert_eq!(c.layers.to_vec(), layers, "{name}");
        assert_eq!(c.widths.to_vec(), widths, "{name}");
        assert_eq!(c.stem_width as u64, m["stem"].as_u64().unwrap(), "{name}");
        assert_eq!(
            c.num_classes.map(|n| n as u64),
            m["classes"].as_u64(),
            "{name}"
        );
        if kind == BlockKind::Bottleneck {
            let s11 = m["stride_on_1x1"].as_bool().unwrap();
            let expected = if s11 {
                StridePlacement::Conv1x1
            } else {
                StridePlacement::Conv3x3
            };
            assert_eq!(c.stride_on, expected, "{name}");
        }
        assert_eq!(
            loaded.provenance.folded_batchnorm,
            m["folded"].as_bool().unwrap(),
            "{name}"
        );
        assert_eq!(loaded.provenance.format, WeightFormat::Onnx);
        // torchvision exports get torchvision's normalization.
        assert_eq!(loaded.normalization.mean, [0.485, 0.456, 0.406], "{name}");
        let ours = run(
            &loaded.model,
            &fixtures().join(format!("{name}.input.npy")),
            &device,
        );
        let (_, reference) = npy::read_f32(&fixtures().join(format!("{name}.output.npy"))).unwrap();
        let err = rel_err(&ours, &reference);
        assert!(err <= 1e-4, "{name}: relative error {err} > 1e-4");
        // BatchNorm folded into the convolutions (the same function), and
        // not folded but applied in-tile: on flex both run the fused path.
        let backbone = Backbone::from(loaded);
        for (how, bn) in [
            ("folded", BatchNormUse::Folded),
            ("fused", BatchNormUse::Running),
        ] {
            assert_eq!(backbone.kernels_for(&device, bn), "fused", "{name} {how}");
            let ours = run_backbone(
                &backbone,
                bn,
                &fixtures().join(format!("{name}.input.npy")),
                &device,
            );
            let err = rel_err(&ours, &reference);
            assert!(err <= 1e-4, "{name} {how}: relative error {err} > 1e-4");
        }
    }
}

#[test]
fn dynamic_and_fixed_batch_files_accept_any_batch_size() {
    let device = parse_device("flex").unwrap();
    for name in ["basic_folded_op11", "basic_uneven_unfolded_op13"] {
        let loaded = load_weights(
            &fixtures().join(format!("{name}.onnx")),
            &device,
            &LoadOptions::default(),
        )
        .unwrap();
        let (shape, values) = npy::read_f32(&fixtures().join(format!("{name}.input.npy"))).unwrap();
        // Batch 1 (first image) must equal row 0 of the batch-2 reference.
        let per = values.len() / shape[0];
        let one = Tensor::<4>::from_data(
            TensorData::new(values[..per].to_vec(), [1, shape[1], shape[2], shape[3]]),
            &device,
        );
        let out = loaded
            .model
            .forward(one)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let (_, reference) = npy::read_f32(&fixtures().join(format!("{name}.output.npy"))).unwrap();
        let err = rel_err(&out, &reference[..out.len()]);
        assert!(err <= 1e-4, "{name} at batch 1: {err}");
    }
}

#[test]
fn state_dicts_load_through_burn_store_and_match() {
    let device = parse_device("flex").unwrap();
    let name = "basic_folded_op11";
    let (_, reference) = npy::read_f32(&fixtures().join(format!("{name}.output.npy"))).unwrap();
    for ext in ["pth", "safetensors"] {
        let path = fixtures().join(format!("{name}.{ext}"));
        let loaded = load_weights(&path, &device, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{ext}: {e}"));
        assert_eq!(loaded.config.layers, [1, 1, 1, 1]);
        assert_eq!(loaded.config.widths, [8, 16, 16, 32]);
        assert_eq!(loaded.config.num_classes, Some(10));
        let ours = run(
            &loaded.model,
            &fixtures().join(format!("{name}.input.npy")),
            &device,
        );
        let err = rel_err(&ours, &reference);
        assert!(err <= 1e-4, "{ext}: relative error {err}");
    }
}

#[test]
fn torchvision_state_dict_export_round_trips_with_pytorch_names_and_layouts() {
    let device = parse_device("flex").unwrap();
    let name = "basic_folded_op11";
    let loaded = load_weights(
        &fixtures().join(format!("{name}.onnx")),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("avp-tv-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("state.safetensors");
    avp_model::weights::save_torchvision(&loaded.model, &out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shape = |k: &str| {
        st.tensor(k)
            .unwrap_or_else(|e| panic!("{k}: {e}"))
            .shape()
            .to_vec()
    };
    // torchvision's names; PyTorch's [out, in] for the classifier.
    assert_eq!(shape("fc.weight"), [10, 32]);
    assert_eq!(shape("layer2.0.downsample.0.weight"), [16, 8, 1, 1]);
    assert_eq!(shape("layer2.0.downsample.1.running_var"), [16]);
    assert_eq!(shape("bn1.weight"), [8]);
    assert!(
        st.names()
            .iter()
            .all(|k| !k.contains("gamma") && !k.contains(".conv."))
    );
    // avp reads it back as the same network.
    let again = load_weights(&out, &device, &LoadOptions::default()).unwrap();
    let input = fixtures().join(format!("{name}.input.npy"));
    let (a, b) = (
        run(&loaded.model, &input, &device),
        run(&again.model, &input, &device),
    );
    assert!(rel_err(&a, &b) <= 1e-6, "{}", rel_err(&a, &b));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn native_format_round_trips_with_metadata() {
    let device = parse_device("flex").unwrap();
    let name = "bottleneck_stride1x1_unfolded_op15";
    let loaded = load_weights(
        &fixtures().join(format!("{name}.onnx")),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("avp-native-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bpk = dir.join("model.bpk");
    save_native(
        &loaded.model,
        &loaded.config,
        &loaded.normalization,
        &loaded.provenance,
        &bpk,
    )
    .unwrap();
    let reloaded = load_weights(&bpk, &device, &LoadOptions::default()).unwrap();
    assert_eq!(reloaded.provenance.format, WeightFormat::Burnpack);
    assert_eq!(reloaded.config.stride_on, StridePlacement::Conv1x1);
    assert_eq!(reloaded.normalization, loaded.normalization);
    let original = reloaded
        .provenance
        .converted_from
        .as_ref()
        .expect("original provenance kept");
    assert_eq!(original.sha256, loaded.provenance.sha256);
    let input = fixtures().join(format!("{name}.input.npy"));
    assert_eq!(
        run(&loaded.model, &input, &device),
        run(&reloaded.model, &input, &device)
    );
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------- bad input

fn small_fixture() -> (PathBuf, Vec<u8>) {
    let path = fixtures().join("bottleneck_folded_op17_headless.onnx");
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

fn mutate(f: impl FnOnce(&mut ModelProto)) -> Result<avp_model::onnx::ImportedResNet, ModelError> {
    let (path, bytes) = small_fixture();
    let mut m = ModelProto::decode(&bytes[..]).unwrap();
    f(&mut m);
    import_resnet_bytes(&path, &m.encode_to_vec())
}

fn weight_of_first_conv(m: &mut ModelProto) -> &mut TensorProto {
    let g = m.graph.as_mut().unwrap();
    let w = g.node.iter().find(|n| n.op_type == "Conv").unwrap().input[1].clone();
    g.initializer.iter_mut().find(|t| t.name == w).unwrap()
}

#[test]
fn a_text_file_is_not_onnx() {
    let e =
        import_resnet_bytes(Path::new("notes.onnx"), b"this is not a protobuf at all").unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("notes.onnx is not a valid ONNX file"), "{msg}");
}

#[test]
fn a_missing_file_names_the_path() {
    let device = parse_device("flex").unwrap();
    let e = load_weights(
        Path::new("/nonexistent/model.onnx"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/model.onnx"), "{e}");
    let e = load_weights(
        &fixtures().join("fixtures.json"),
        &device,
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown weights format"), "{e}");
}

#[test]
fn a_truncated_file_is_refused() {
    let (path, bytes) = small_fixture();
    let e = import_resnet_bytes(&path, &bytes[..bytes.len() / 2]).unwrap_err();
    assert!(matches!(e, ModelError::NotOnnx { .. }), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn a_graph_that_is_not_a_resnet_names_the_node() {
    let e = mutate(|m| {
        let g = m.graph.as_mut().unwrap();
        let relu = g.node.iter_mut().find(|n| n.op_type == "Relu").unwrap();
        relu.op_type = "Sigmoid".into();
        relu.name = "the_odd_one".into();
    })
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ModelError::NotResNet { .. }), "{msg}");
    assert!(
        msg.contains("the_odd_one") && msg.contains("Sigmoid"),
        "{msg}"
    );
}

#[test]
fn a_shape_mismatch_names_layer_expected_and_found() {
    // Drop the last output channel of the stem convolution.
    let e = mutate(|m| {
        let t = weight_of_first_conv(m);
        let per = (t.dims[1] * t.dims[2] * t.dims[3]) as usize;
        t.dims[0] -= 1;
        let keep = t.raw_data.len() - per * 4;
        t.raw_data.truncate(keep);
    })
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ModelError::Shape { .. }), "{msg}");
    assert!(
        msg.contains("conv1") && msg.contains("expected") && msg.contains("found"),
        "{msg}"
    );
}

#[test]
fn declared_size_larger_than_data_is_refused_before_allocation() {
    // A 3x3 convolution deep in the network declares 2^40 output channels:
    // the structure still reads as a ResNet, so the size check is what refuses it.
    let e = mutate(|m| {
        let g = m.graph.as_mut().unwrap();
        let names: Vec<String> = g
            .node
            .iter()
            .filter(|n| n.op_type == "Conv")
            .map(|n| n.input[1].clone())
            .collect();
        let t = g
            .initializer
            .iter_mut()
            .filter(|t| names.contains(&t.name) && t.dims.get(2) == Some(&3))
            .last()
            .unwrap();
        t.dims[0] = 1 << 40;
    })
    .unwrap_err();
    assert!(matches!(e, ModelError::CorruptTensor { .. }), "{e}");
    assert!(e.to_string().contains("too large"), "{e}");
    // A length prefix far beyond the end of the file is a decode error.
    let mut forged = vec![0x3a]; // field 7 (graph), wire type 2
    forged.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // length 2^32 - 1
    forged.extend_from_slice(&[0u8; 16]);
    let e = import_resnet_bytes(Path::new("forged.onnx"), &forged).unwrap_err();
    assert!(matches!(e, ModelError::NotOnnx { .. }), "{e}");
}

#[test]
fn missing_external_data_is_explained() {
    let e = mutate(|m| {
        let t = weight_of_first_conv(m);
        t.raw_data.clear();
        t.data_location = 1;
        t.external_data = vec![avp_model::onnx::proto::StringStringEntryProto {
            key: "location".into(),
            value: "weights.bin".into(),
        }];
    })
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ModelError::ExternalData { .. }), "{msg}");
    assert!(
        msg.contains("weights.bin") && msg.contains("cannot be opened"),
        "{msg}"
    );
}

#[test]
fn external_data_next_to_the_file_is_read() {
    let (_, bytes) = small_fixture();
    let mut m = ModelProto::decode(&bytes[..]).unwrap();
    let t = weight_of_first_conv(&mut m);
    let data = std::mem::take(&mut t.raw_data);
    t.data_location = 1;
    t.external_data = vec![
        avp_model::onnx::proto::StringStringEntryProto {
            key: "location".into(),
            value: "ext.bin".into(),
        },
        avp_model::onnx::proto::StringStringEntryProto {
            key: "offset".into(),
            value: "4".into(),
        },
        avp_model::onnx::proto::StringStringEntryProto {
            key: "length".into(),
            value: data.len().to_string(),
        },
    ];
    let dir = std::env::temp_dir().join(format!("avp-ext-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ext = vec![0u8; 4];
    ext.extend_from_slice(&data);
    std::fs::write(dir.join("ext.bin"), &ext).unwrap();
    let imported = import_resnet_bytes(&dir.join("model.onnx"), &m.encode_to_vec()).unwrap();
    let reference = import_resnet_bytes(&fixtures().join("x.onnx"), &bytes).unwrap();
    assert_eq!(
        imported.weights["conv1.weight"].values,
        reference.weights["conv1.weight"].values
    );
    // Cut the external file short: refused with its size.
    std::fs::write(dir.join("ext.bin"), &ext[..ext.len() - 1]).unwrap();
    let e = import_resnet_bytes(&dir.join("model.onnx"), &m.encode_to_vec()).unwrap_err();
    assert!(e.to_string().contains("too short"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_unsupported_data_type_is_named() {
    let e = mutate(|m| {
        let t = weight_of_first_conv(m);
        t.data_type = 16; // BFLOAT16
    })
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ModelError::DataType { .. }), "{msg}");
    assert!(msg.contains("BFLOAT16"), "{msg}");
}

// ------------------------------------------------------------ hostile files

/// Every outcome must be an error or a model that can be built.
fn check_no_panic(path: &Path, bytes: &[u8], device: &Device) -> bool {
    match import_resnet_bytes(path, bytes) {
        Ok(imported) => {
            if imported.config.validate().is_ok() {
                avp_model::fill(imported.config.init(device), imported.weights, path).ok();
            }
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

#[test]
fn truncation_at_every_offset_never_panics() {
    let device = parse_device("flex").unwrap();
    let (path, bytes) = small_fixture();
    let mut ok = 0;
    for cut in 0..bytes.len() {
        if check_no_panic(&path, &bytes[..cut], &device) {
            ok += 1;
        }
    }
    // Cutting inside the last bytes may leave a decodable prefix; most cuts must fail.
    assert!(ok < bytes.len() / 100, "{ok} truncated files imported");
}

#[test]
fn thousands_of_random_mutations_never_panic() {
    let device = parse_device("flex").unwrap();
    let (path, bytes) = small_fixture();
    // xorshift: seeded, reproducible, no dependency.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for _ in 0..3000 {
        let mut b = bytes.clone();
        let flips = 1 + next() % 8;
        for _ in 0..flips {
            let i = (next() % b.len() as u64) as usize;
            b[i] = next() as u8;
        }
        if !check_no_panic(&path, &b, &device) {
            errors += 1;
        }
    }
    assert!(
        errors > 0,
        "no mutation was refused: the mutations are not reaching the structure"
    );
}

// ----------------------------------------------------------- other backends

#[cfg(any(feature = "ndarray", feature = "wgpu"))]
fn parity_on(device_name: &str, tolerance: f32) {
    let device = parse_device(device_name).unwrap();
    for name in [
        "basic_uneven_unfolded_op13",
        "bottleneck_stride1x1_unfolded_op15",
    ] {
        let loaded = load_weights(
            &fixtures().join(format!("{name}.onnx")),
            &device,
            &LoadOptions::default(),
        )
        .unwrap();
        let ours = run(
            &loaded.model,
            &fixtures().join(format!("{name}.input.npy")),
            &device,
        );
        let (_, reference) = npy::read_f32(&fixtures().join(format!("{name}.output.npy"))).unwrap();
        let err = rel_err(&ours, &reference);
        assert!(
            err <= tolerance,
            "{device_name} {name}: relative error {err} > {tolerance}"
        );
    }
}

#[cfg(feature = "ndarray")]
#[test]
fn ndarray_matches_onnxruntime() {
    parity_on("ndarray", 1e-4);
}

#[cfg(feature = "wgpu")]
#[test]
#[ignore = "needs a Vulkan adapter (Mesa's lavapipe: apt-get install mesa-vulkan-drivers); .ci/run installs it and runs this"]
fn wgpu_matches_onnxruntime() {
    parity_on("wgpu", 1e-3);
}

// ------------------------------------------------- lesson BatchNorm mode

#[test]
fn batch_statistics_mode_matches_pytorch_train_forward_and_running_stats() {
    // tests/fixtures/bn/make_reference.py: PyTorch's model.train() forward.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bn");
    let device = parse_device("flex").unwrap();
    // Burn's modules, then the fused path, each on a fresh load.
    for fused in [false, true] {
        check_batch_statistics(&dir, &device, fused);
    }
}

fn check_batch_statistics(dir: &Path, device: &Device, fused: bool) {
    let loaded = load_weights(&dir.join("model.onnx"), device, &LoadOptions::default()).unwrap();
    let kernels = if fused { Kernels::Fused } else { Kernels::Burn };
    let backbone = Backbone::from(loaded).with_kernels(kernels).unwrap();
    let (shape, values) = npy::read_f32(&dir.join("input.npy")).unwrap();
    let x = Tensor::<4>::from_data(TensorData::new(values, shape), device);
    let ours = backbone
        .features(x, BatchNormUse::Batch)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let (_, reference) = npy::read_f32(&dir.join("train_features.npy")).unwrap();
    let err = rel_err(&ours, &reference);
    assert!(
        err <= 1e-4,
        "features with batch statistics (fused: {fused}): relative error {err}"
    );
    let stats = |bn: &burn::nn::BatchNorm| {
        (
            bn.running_mean
                .value_sync()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap(),
            bn.running_var
                .value_sync()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap(),
        )
    };
    for (name, bn) in [
        ("bn1", &backbone.network().bn1),
        ("l4_bn2", &backbone.network().layer4[0].bn2),
    ] {
        let (mean, var) = stats(bn);
        let (_, ref_mean) = npy::read_f32(&dir.join(format!("{name}_mean.npy"))).unwrap();
        let (_, ref_var) = npy::read_f32(&dir.join(format!("{name}_var.npy"))).unwrap();
        assert!(
            rel_err(&mean, &ref_mean) <= 1e-4,
            "{name} running mean (fused: {fused})"
        );
        assert!(
            rel_err(&var, &ref_var) <= 1e-4,
            "{name} running variance, unbiased (fused: {fused})"
        );
    }
}
