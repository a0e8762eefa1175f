//! Fine-tuning: the trained stages move and the frozen ones do not, the
//! saved model predicts what the trained one did, settings that cannot
//! work are refused before anything is written, and (with the reference
//! .ci/run generates) one optimiser step equals PyTorch's.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::sync::Arc;

use avp_data::ImageBatch;
use avp_model::{Backbone, LoadOptions, Stage, load_weights, parse_device};
use avp_train::finetune::{optimizer, schedule};
use avp_train::{BnMode, Classifier, HeadConfig, OptimizerKind, TrainConfig, train};
use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::BatchNorm;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::TrainStep;

mod common;
use common::{make_dataset, max_diff, scratch, serial, tiny_backbone, values};

fn finetune_config() -> TrainConfig {
    TrainConfig::new()
        .with_epochs(3)
        .with_batch_size(4)
        .with_lr(1e-2)
        .with_finetune(vec![Stage::Layer4])
        .with_backbone_lr(Some(1e-3))
}

/// Trains `layer4` and the head on `device`; returns what the run checks.
fn finetune_run(device_name: &str) {
    let _serial = serial();
    let s = scratch(&format!("finetune-{device_name}"));
    let data = s.0.join("data");
    make_dataset(&data, (12, 6));
    let device = parse_device(device_name).unwrap();
    let original = tiny_backbone(&device).model;
    let out = s.0.join("out");
    let config = finetune_config();
    let outcome = train(tiny_backbone(&device), &data, &out, &config, &device).unwrap();
    assert_eq!(outcome.epochs.len(), 3);
    let last = outcome.epochs.last().unwrap();
    assert!(
        last.valid_acc >= 0.75,
        "validation accuracy {}: {:?}",
        last.valid_acc,
        outcome.epochs
    );
    // layer4 trained (weights and running statistics), the stages before it did not.
    let net = outcome.model.classifier.backbone.0.network();
    assert!(outcome.model.classifier.trained_stages.is_none(), "merged");
    let w = |n: &avp_model::ResNet| values(n.layer4[0].conv1.weight.val());
    assert!(
        max_diff(&w(net), &w(&original)) > 1e-6,
        "layer4 did not move"
    );
    let rm = |n: &avp_model::ResNet| values(n.layer4[0].bn1.running_mean.value_sync());
    assert!(
        max_diff(&rm(net), &rm(&original)) > 1e-6,
        "layer4's running statistics did not move"
    );
    let frozen = |n: &avp_model::ResNet| {
        let mut v = values(n.conv1.weight.val());
        v.extend(values(n.layer3[0].conv2.weight.val()));
        v.extend(values(n.layer3[0].bn2.running_var.value_sync()));
        v
    };
    assert_eq!(frozen(net), frozen(&original), "a frozen stage moved");
    // config.json records the stages and the optimiser.
    let saved = TrainConfig::load(out.join("config.json")).unwrap();
    assert_eq!(saved.finetune, [Stage::Layer4]);
    assert_eq!(saved.backbone_lr, Some(1e-3));
    assert_eq!(saved.optimizer, OptimizerKind::Adam);
    let json = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(
        json.contains("\"finetune\"") && json.contains("\"layer4\""),
        "{json}"
    );
    // model.bpk holds the fine-tuned stage: it predicts what the trained model does.
    let loaded = avp_train::load_model(&out.join("model.bpk"), &device).unwrap();
    let paths: Vec<PathBuf> = ["val/red/0.png", "val/blue/1.png", "val/red/3.png"]
        .iter()
        .map(|p| data.join(p))
        .collect();
    let a = outcome.model.predict_paths(&paths, 2).unwrap();
    let b = loaded.predict_paths(&paths, 2).unwrap();
    for (x, y) in a.iter().zip(&b) {
        let d = max_diff(&x.probabilities, &y.probabilities);
        assert!(d < 1e-5, "{}: {d}", x.path.display());
    }
}

#[test]
fn finetuning_layer4_on_flex_trains_layer4_only_and_saves_it() {
    finetune_run("flex");
}

#[cfg(feature = "ndarray")]
#[test]
fn finetuning_layer4_on_ndarray_trains_layer4_only_and_saves_it() {
    finetune_run("ndarray");
}

/// Fine-tuning on the cached frozen prefix: the map entering layer4 is
/// computed once (K views with augmentation), read back by a second run,
/// refused when it would not fit; the model trains and saves as without
/// the cache.
#[test]
fn the_prefix_cache_trains_is_reused_and_is_refused_when_too_large() {
    let _serial = serial();
    let s = scratch("finetune-cache");
    let data = s.0.join("data");
    make_dataset(&data, (12, 6));
    let device = parse_device("flex").unwrap();
    let config = finetune_config()
        .with_feature_cache(true)
        .with_cache_views(2)
        .with_cache_dir(Some(s.0.join("features")));
    let out = s.0.join("out");
    let first = train(tiny_backbone(&device), &data, &out, &config, &device).unwrap();
    assert_eq!(first.cache, Some(avp_train::CacheOrigin::Computed));
    let last = first.epochs.last().unwrap();
    assert!(last.valid_acc >= 0.75, "{:?}", first.epochs);
    let original = tiny_backbone(&device).model;
    let net = first.model.classifier.backbone.0.network();
    assert!(
        max_diff(
            &values(net.layer4[0].conv1.weight.val()),
            &values(original.layer4[0].conv1.weight.val())
        ) > 1e-6,
        "layer4 did not train"
    );
    assert_eq!(
        values(net.layer3[0].conv1.weight.val()),
        values(original.layer3[0].conv1.weight.val())
    );
    // Stored apart from pooled features: a second run reads them back and
    // trains the same model.
    let again = train(
        tiny_backbone(&device),
        &data,
        &s.0.join("again"),
        &config,
        &device,
    )
    .unwrap();
    assert_eq!(again.cache, Some(avp_train::CacheOrigin::Disk));
    let acc = |o: &avp_train::TrainOutcome| {
        o.epochs
            .iter()
            .map(|m| (m.train_loss, m.valid_acc))
            .collect::<Vec<_>>()
    };
    assert_eq!(acc(&first), acc(&again));
    let x = Tensor::<4>::ones([2, 3, 64, 64], &device);
    let loaded = avp_train::load_model(&out.join("model.bpk"), &device).unwrap();
    let d = max_diff(
        &values(first.model.classifier.probabilities(x.clone())),
        &values(loaded.classifier.probabilities(x)),
    );
    assert!(d < 1e-5, "{d}");
    // Too large for the limit: refused before anything runs, naming the map.
    let e = train(
        tiny_backbone(&device),
        &data,
        &s.0.join("none"),
        &config.clone().with_cache_max_gb(1e-6),
        &device,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("map before layer4") && e.contains("--cache-max-gb"),
        "{e}"
    );
    assert!(!s.0.join("none").exists());
}

/// The merged classifier (fine-tuned stages put back into the backbone,
/// then folded and fused) computes what the classifier with its trained
/// stages computes in validation.
#[test]
fn the_merged_model_computes_what_the_trained_stages_compute() {
    let _serial = serial();
    let device = parse_device("flex").unwrap();
    let ad = device.clone().autodiff();
    let backbone = Arc::new(Backbone::from(tiny_backbone(&device)).headless());
    let head = HeadConfig::new()
        .init(backbone.num_features(), 3, &ad)
        .unwrap();
    let mut model = Classifier::new(backbone, head, BnMode::Frozen)
        .unwrap()
        .with_trained_stages(Stage::Layer3, &device);
    assert_eq!(model.finetuned(), [Stage::Layer3, Stage::Layer4]);
    // Two SGD steps move layer3, layer4 and their running statistics.
    let config = finetune_config()
        .with_finetune(vec![Stage::Layer3, Stage::Layer4])
        .with_optimizer(OptimizerKind::Sgd)
        .with_momentum(0.9);
    let mut optim = optimizer(&config);
    let mut lrs = schedule(&config, 1).unwrap();
    let x = Tensor::<4>::random(
        [4, 3, 64, 64],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    for _ in 0..2 {
        let batch = ImageBatch {
            images: x.clone().to_device(&ad),
            targets: Tensor::<1, Int>::from_data(TensorData::from([0i64, 1, 2, 1]), &ad),
            indices: vec![0, 1, 2, 3],
        };
        let out = TrainStep::step(&model, batch);
        model = optim.step(lrs.step(), model, out.grads);
    }
    let trained = model.valid();
    let a = values(trained.probabilities(x.clone()));
    let merged = trained.merged().unwrap();
    assert!(merged.trained_stages.is_none());
    let b = values(merged.probabilities(x));
    let d = max_diff(&a, &b);
    assert!(d < 1e-5, "trained stages vs merged model: {d}");
}

#[test]
fn settings_that_cannot_work_are_refused_before_anything_is_written() {
    let _serial = serial();
    let s = scratch("finetune-refused");
    let data = s.0.join("data");
    make_dataset(&data, (2, 1));
    let device = parse_device("flex").unwrap();
    let out = s.0.join("out");
    for (config, says) in [
        (
            finetune_config().with_bn_mode(BnMode::Lesson),
            "drop --bn-mode lesson",
        ),
        (
            TrainConfig::new().with_backbone_lr(Some(1e-4)),
            "--backbone-lr",
        ),
        (
            finetune_config().with_finetune(vec![Stage::Layer3]),
            "--finetune layer3,layer4",
        ),
        (TrainConfig::new().with_momentum(0.9), "--optimizer sgd"),
    ] {
        let e = train(tiny_backbone(&device), &data, &out, &config, &device)
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{says}: {e}");
        assert!(!out.exists(), "a refused run wrote {}", out.display());
    }
}

// ---------------------------------------------------------------------
// One step against PyTorch (tests/fixtures/finetune/make_reference.py).

fn reference_dir() -> PathBuf {
    let var = "AVP_FINETUNE_REF";
    let dir =
        std::env::var(var).unwrap_or_else(|_| panic!("set {var} (see .ci/run) to run this suite"));
    let dir = PathBuf::from(dir);
    assert!(dir.is_dir(), "{var}={} does not exist", dir.display());
    dir
}

fn npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    avp_model::npy::read_f32(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every tensor of `layer4` and the head, named as PyTorch's state dict
/// names them, in PyTorch's layout.
fn state(model: &Classifier) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    let bn = |name: String, bn: &BatchNorm, out: &mut Vec<(String, Vec<f32>)>| {
        out.push((format!("{name}.weight"), values(bn.gamma.val())));
        out.push((format!("{name}.bias"), values(bn.beta.val())));
        out.push((
            format!("{name}.running_mean"),
            values(bn.running_mean.value_sync()),
        ));
        out.push((
            format!("{name}.running_var"),
            values(bn.running_var.value_sync()),
        ));
    };
    let stages = model.trained_stages.as_ref().unwrap();
    for (i, b) in stages.layer4.iter().enumerate() {
        let p = format!("layer4.{i}");
        out.push((format!("{p}.conv1.weight"), values(b.conv1.weight.val())));
        bn(format!("{p}.bn1"), &b.bn1, &mut out);
        out.push((format!("{p}.conv2.weight"), values(b.conv2.weight.val())));
        bn(format!("{p}.bn2"), &b.bn2, &mut out);
        if let Some(ds) = &b.downsample {
            out.push((
                format!("{p}.downsample.0.weight"),
                values(ds.conv.weight.val()),
            ));
            bn(format!("{p}.downsample.1"), &ds.bn, &mut out);
        }
    }
    for (i, layer) in model.head.layers.iter().enumerate() {
        // Burn's Linear is [in, out]; PyTorch's [out, in].
        out.push((
            format!("fc.{}.weight", 2 * i),
            values(layer.weight.val().transpose()),
        ));
        let bias = layer.bias.as_ref().unwrap();
        out.push((format!("fc.{}.bias", 2 * i), values(bias.val())));
    }
    out
}

fn set_linear(layer: &mut burn::nn::Linear, dir: &Path, key: &str, device: &Device) {
    let (shape, w) = npy(&dir.join(format!("head.{key}.weight.npy")));
    let t = Tensor::<2>::from_data(TensorData::new(w, [shape[0], shape[1]]), device).transpose();
    layer.weight = Param::from_tensor(t);
    let (shape, b) = npy(&dir.join(format!("head.{key}.bias.npy")));
    layer.bias = Some(Param::from_tensor(Tensor::<1>::from_data(
        TensorData::new(b, [shape[0]]),
        device,
    )));
}

fn one_recipe(dir: &Path, device: &Device, recipe: &str, config: &TrainConfig, steps: usize) {
    let loaded = load_weights(&dir.join("resnet18.pth"), device, &LoadOptions::default()).unwrap();
    let backbone = Arc::new(Backbone::from(loaded).headless());
    let ad = device.clone().autodiff();
    let mut head = HeadConfig::new().init(512, 2, &ad).unwrap();
    set_linear(&mut head.layers[0], dir, "0", &ad);
    set_linear(&mut head.layers[1], dir, "2", &ad);
    let mut model = Classifier::new(backbone, head, BnMode::Frozen)
        .unwrap()
        .with_trained_stages(Stage::Layer4, device);
    let before = state(&model);
    let (xs, x) = npy(&dir.join("input.npy"));
    let (_, y) = npy(&dir.join("targets.npy"));
    let (_, losses) = npy(&dir.join(recipe).join("loss.npy"));
    let mut optim = optimizer(config);
    let mut lrs = schedule(config, 1).unwrap();
    for (step, reference_loss) in losses.iter().enumerate().take(steps) {
        let batch = ImageBatch {
            images: Tensor::<4>::from_data(
                TensorData::new(x.clone(), [xs[0], xs[1], xs[2], xs[3]]),
                &ad,
            ),
            targets: Tensor::<1, Int>::from_data(
                TensorData::new(y.iter().map(|v| *v as i64).collect::<Vec<_>>(), [y.len()]),
                &ad,
            ),
            indices: (0..y.len()).collect(),
        };
        let out = TrainStep::step(&model, batch);
        let loss = values(out.item.loss.clone())[0];
        assert!(
            (loss - reference_loss).abs() <= 1e-4 * reference_loss.abs().max(1.0),
            "{recipe} step {step}: loss {loss} vs PyTorch {reference_loss}"
        );
        model = optim.step(lrs.step(), model, out.grads);
    }
    let after = state(&model);
    let (mut worst, mut worst_update, mut worst_frac) = (
        (0f64, String::new()),
        (0f64, String::new()),
        (0f64, String::new()),
    );
    for ((name, ours), (_, was)) in after.iter().zip(&before) {
        let (_, theirs) = npy(&dir.join(recipe).join(format!("{name}.npy")));
        let rel = norm_error(ours, &theirs);
        // The updates themselves, which a wrong learning rate or a missing
        // step would change while leaving the weights close.
        let d_ours: Vec<f32> = ours.iter().zip(was).map(|(a, b)| a - b).collect();
        let d_theirs: Vec<f32> = theirs.iter().zip(was).map(|(a, b)| a - b).collect();
        let step = d_theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(step > 0.0, "{recipe}: {name} did not move in PyTorch");
        let upd = norm_error(&d_ours, &d_theirs);
        // Adam moves a weight by lr·g/(|g|+1e-8): where |g| is near 1e-8,
        // float summation order decides most of the step. Count those.
        let off = d_ours
            .iter()
            .zip(&d_theirs)
            .filter(|(a, b)| (*a - *b).abs() > 0.05 * step)
            .count() as f64
            / d_ours.len() as f64;
        for (w, v) in [
            (&mut worst, rel),
            (&mut worst_update, upd),
            (&mut worst_frac, off),
        ] {
            if v > w.0 {
                *w = (v, name.clone());
            }
        }
    }
    println!(
        "{recipe}: {} tensors of layer4 and the head; worst relative error (L2) {:.1e} ({}); \
         worst update error (L2) {:.1e} ({}); most elements whose step differs by >5%: {:.1e} ({})",
        after.len(),
        worst.0,
        worst.1,
        worst_update.0,
        worst_update.1,
        worst_frac.0,
        worst_frac.1
    );
    assert!(
        worst.0 <= 1e-4,
        "{recipe}: {} off by {:.2e}",
        worst.1,
        worst.0
    );
    // The bar is for the mistakes this check is here for (a wrong learning
    // rate, momentum or weight decay, a missing step: errors of 10% and
    // more), not for float rounding. Rounding reaches 1.0-1.05e-2 on flex
    // at 224x224, in the SGD update of `layer4.0.bn1.weight` (a sum over
    // every pixel that nearly cancels), from F(4x4) Winograd's rounding in
    // the frozen prefix (5e-5 of the features): with `AVP_WINOGRAD=f2` the
    // same update agrees to 8e-5, and Burn's own kernels (ndarray) to 1e-4.
    assert!(
        worst_update.0 <= 2e-2,
        "{recipe}: the update of {} off by {:.2e}",
        worst_update.1,
        worst_update.0
    );
    assert!(
        worst_frac.0 <= 1e-4,
        "{recipe}: {:.1e} of {}'s steps differ",
        worst_frac.0,
        worst_frac.1
    );
}

/// `‖a − b‖ / ‖b‖`.
fn norm_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

#[test]
#[ignore = "needs the PyTorch reference that .ci/run generates (AVP_FINETUNE_REF)"]
fn one_step_equals_pytorchs() {
    let dir = reference_dir();
    let adam = TrainConfig::new()
        .with_lr(1e-3)
        .with_finetune(vec![Stage::Layer4])
        .with_backbone_lr(Some(1e-4));
    let sgd = adam
        .clone()
        .with_lr(1e-2)
        .with_backbone_lr(Some(1e-3))
        .with_optimizer(OptimizerKind::Sgd)
        .with_momentum(0.9)
        .with_weight_decay(1e-4);
    let mut devices = vec!["flex"];
    if cfg!(feature = "ndarray") {
        devices.push("ndarray");
    }
    // 64x64 input (`layer4` at 2x2: the direct products) and 224x224
    // (`layer4` at 7x7: Winograd on flex); `.ci/run` writes both.
    let large = dir.join("224");
    assert!(
        large.is_dir(),
        "{} is missing (make_reference.py --size 224)",
        large.display()
    );
    for name in devices {
        let device = parse_device(name).unwrap();
        for dir in [&dir, &large] {
            println!("{name}, {}:", dir.display());
            one_recipe(dir, &device, "adam", &adam, 1);
            one_recipe(dir, &device, "sgd", &sgd, 2);
        }
    }
}
