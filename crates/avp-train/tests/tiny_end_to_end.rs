//! Whole training runs on generated images with a tiny ResNet:
//! runs on a fresh machine without ../shared, in seconds.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use avp_model::parse_device;
use avp_train::{BnMode, TrainConfig, TrainError, train};
use burn::config::Config;
use burn::module::Module;

mod common;
use common::{make_dataset, scratch, serial, tiny_backbone, values};

fn snapshot(m: &avp_model::ResNet) -> Vec<f32> {
    let mut v = m
        .conv1
        .weight
        .val()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    v.extend(
        m.bn1
            .running_mean
            .value_sync()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap(),
    );
    v.extend(
        m.layer4[0]
            .bn2
            .running_var
            .value_sync()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap(),
    );
    v
}

#[test]
fn three_epochs_on_generated_images_learn_and_leave_the_frozen_backbone_untouched() {
    let _serial = serial();
    let s = scratch("e2e");
    let data = s.0.join("data");
    make_dataset(&data, (12, 6));
    let device = parse_device("flex").unwrap();
    let backbone = tiny_backbone(&device);
    let before = snapshot(&backbone.model);
    let config = TrainConfig::new()
        .with_epochs(3)
        .with_batch_size(2)
        .with_lr(3e-2);
    let out = s.0.join("out");
    let outcome = train(backbone, &data, &out, &config, &device).unwrap();
    assert_eq!(outcome.model.classes, ["blue", "red"]);
    assert_eq!(outcome.epochs.len(), 3);
    let last = outcome.epochs.last().unwrap();
    assert!(
        last.valid_acc >= 0.75,
        "validation accuracy {}",
        last.valid_acc
    );
    // Frozen means frozen: not a bit of the backbone moved.
    assert_eq!(
        before,
        snapshot(outcome.model.classifier.backbone.0.network())
    );
    // Artifacts.
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3 * 2, "{csv}");
    assert!(csv.starts_with("epoch,phase,loss,accuracy,seconds"));
    let reloaded = TrainConfig::load(out.join("config.json")).unwrap();
    assert_eq!(reloaded.epochs, 3);
    let _ = outcome.model.classifier.head.num_params();
}

#[test]
fn lesson_mode_updates_running_statistics() {
    let _serial = serial();
    let s = scratch("lesson");
    let data = s.0.join("data");
    make_dataset(&data, (8, 4));
    let device = parse_device("flex").unwrap();
    let backbone = tiny_backbone(&device);
    let before = snapshot(&backbone.model);
    let config = TrainConfig::new()
        .with_epochs(1)
        .with_batch_size(8)
        .with_bn_mode(BnMode::Lesson);
    let outcome = train(backbone, &data, &s.0.join("out"), &config, &device).unwrap();
    assert_ne!(
        before,
        snapshot(outcome.model.classifier.backbone.0.network()),
        "batch statistics must move the running statistics"
    );
}

#[test]
fn bad_datasets_are_explained() {
    let device = parse_device("flex").unwrap();
    // One class.
    let s = scratch("oneclass");
    make_dataset(&s.0, (2, 2));
    std::fs::remove_dir_all(s.0.join("train/red")).unwrap();
    std::fs::remove_dir_all(s.0.join("val/red")).unwrap();
    let e = train(
        tiny_backbone(&device),
        &s.0,
        &s.0.join("out"),
        &TrainConfig::new(),
        &device,
    )
    .unwrap_err();
    assert!(e.to_string().contains("at least two class folders"), "{e}");
    // Classes that differ between the splits.
    let s = scratch("mismatch");
    make_dataset(&s.0, (2, 2));
    std::fs::rename(s.0.join("val/red"), s.0.join("val/green")).unwrap();
    let e = train(
        tiny_backbone(&device),
        &s.0,
        &s.0.join("out"),
        &TrainConfig::new(),
        &device,
    )
    .unwrap_err();
    assert!(matches!(e, TrainError::ClassMismatch { .. }), "{e}");
    // A missing split.
    let s = scratch("nosplit");
    make_dataset(&s.0, (2, 2));
    std::fs::remove_dir_all(s.0.join("val")).unwrap();
    let e = train(
        tiny_backbone(&device),
        &s.0,
        &s.0.join("out"),
        &TrainConfig::new(),
        &device,
    )
    .unwrap_err();
    assert!(e.to_string().contains("no validation split"), "{e}");
}

#[test]
fn a_head_that_does_not_fit_the_backbone_is_refused() {
    let device = parse_device("flex").unwrap();
    let backbone = std::sync::Arc::new(avp_model::Backbone::from(tiny_backbone(&device)));
    let head = avp_train::HeadConfig::new().init(512, 2, &device).unwrap();
    let e = avp_train::Classifier::new(backbone, head, BnMode::Frozen).unwrap_err();
    assert!(
        e.to_string()
            .contains("gives 64 features but the head expects 512"),
        "{e}"
    );
}

#[test]
fn model_bpk_reloads_and_predicts_the_same() {
    let _serial = serial();
    let s = scratch("reload");
    let data = s.0.join("data");
    make_dataset(&data, (6, 3));
    let device = parse_device("flex").unwrap();
    let config = TrainConfig::new()
        .with_epochs(1)
        .with_batch_size(4)
        .with_lr(1e-2)
        .with_augment(false);
    let out = s.0.join("out");
    let outcome = train(tiny_backbone(&device), &data, &out, &config, &device).unwrap();
    assert!(out.join("curves.png").is_file());
    let loaded = avp_train::load_model(&out.join("model.bpk"), &device).unwrap();
    assert_eq!(loaded.classes, outcome.model.classes);
    let x = burn::tensor::Tensor::<4>::ones([2, 3, 64, 64], &device);
    let a = outcome
        .model
        .classifier
        .probabilities(x.clone())
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let b = loaded
        .classifier
        .probabilities(x)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(a, b);
    let e = avp_train::load_model(&out.join("nope.bpk"), &device).unwrap_err();
    assert!(e.to_string().contains("no such file"), "{e}");
}

/// torchvision's conventions as options: the tutorial's RandomResizedCrop
/// for training and `Resize(256)` + `CenterCrop(224)` for validation; the
/// model remembers its evaluation transform, and predictions use it.
#[test]
fn the_tutorial_augmentation_and_the_center_crop_train_and_are_remembered() {
    let _serial = serial();
    let s = scratch("crops");
    let data = s.0.join("data");
    make_dataset(&data, (6, 3));
    let device = parse_device("flex").unwrap();
    let config = TrainConfig::new()
        .with_epochs(1)
        .with_batch_size(4)
        .with_lr(1e-2)
        .with_augmentation(avp_train::Augmentation::Tutorial)
        .with_eval_transform(avp_train::EvalTransform::CenterCrop);
    let out = s.0.join("out");
    let outcome = train(tiny_backbone(&device), &data, &out, &config, &device).unwrap();
    assert_eq!(
        outcome.model.normalization.eval_crop,
        Some(avp_model::EvalCrop::torchvision())
    );
    let loaded = avp_train::load_model(&out.join("model.bpk"), &device).unwrap();
    assert_eq!(
        loaded.normalization.eval_crop,
        outcome.model.normalization.eval_crop
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["augmentation"], "Tutorial", "{saved}");
    assert_eq!(saved["eval_transform"], "CenterCrop", "{saved}");
    // Predictions through the stored transform equal the classifier on the
    // centre-cropped tensor.
    let img = data.join("val/red/0.png");
    let p = loaded.predict_paths(&[&img], 1).unwrap();
    let eval = avp_train::eval_pipeline(&loaded.normalization);
    let x = eval.apply(
        &avp_data::decode_rgb8(&img).unwrap(),
        &mut avp_data::Rng::for_item(0, 0, 0),
    );
    let t = burn::tensor::Tensor::<4>::from_data(
        burn::tensor::TensorData::new(x, [1, 3, 224, 224]),
        &device,
    );
    let direct = loaded
        .classifier
        .probabilities(t)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(p[0].probabilities, direct);
    // The squash gives other probabilities on this non-square image.
    let squash = avp_train::eval_pipeline(&loaded.normalization.clone().with_eval_crop(None));
    assert_ne!(squash, eval);
}

/// A loss that stops being finite stops the run (burn-train's interrupter,
/// fired by the epoch metric) with an error that says what to do, and no
/// model is written.
#[test]
fn a_diverging_loss_stops_the_run_without_a_model() {
    let _serial = serial();
    let s = scratch("diverge");
    let data = s.0.join("data");
    make_dataset(&data, (8, 4));
    let device = parse_device("flex").unwrap();
    let config = TrainConfig::new()
        .with_epochs(3)
        .with_batch_size(4)
        .with_lr(1e30)
        .with_augment(false);
    let out = s.0.join("out");
    let e = train(tiny_backbone(&device), &data, &out, &config, &device).unwrap_err();
    assert!(matches!(e, avp_train::TrainError::Diverged(_)), "{e}");
    assert!(e.to_string().contains("loss became"), "{e}");
    assert!(e.to_string().contains("Lower the learning rate"), "{e}");
    assert!(!out.join("model.bpk").exists());
}

/// The validation memo changes no number: every epoch's losses and
/// accuracies are those of a run that recomputes the frozen backbone's
/// validation outputs in every epoch, frozen and fine-tuning layer4.
#[test]
fn reusing_validation_features_gives_the_numbers_of_recomputing_them() {
    let _serial = serial();
    let s = scratch("valid-reuse");
    let data = s.0.join("data");
    make_dataset(&data, (8, 5));
    let device = parse_device("flex").unwrap();
    for finetune in [vec![], vec![avp_model::Stage::Layer4]] {
        let run = |reuse: bool| {
            let config = TrainConfig::new()
                .with_epochs(3)
                .with_batch_size(3)
                .with_lr(3e-2)
                .with_finetune(finetune.clone())
                .with_valid_reuse(reuse);
            let out = s.0.join(format!("out-{reuse}-{}", finetune.len()));
            train(tiny_backbone(&device), &data, &out, &config, &device)
                .unwrap()
                .epochs
        };
        let (kept, recomputed) = (run(true), run(false));
        assert_eq!(kept.len(), 3);
        for (a, b) in kept.iter().zip(&recomputed) {
            assert_eq!(
                (a.train_loss, a.train_acc, a.valid_loss, a.valid_acc),
                (b.train_loss, b.train_acc, b.valid_loss, b.valid_acc),
                "epoch {} with finetune {finetune:?}",
                a.epoch
            );
        }
    }
}

/// A classifier with a memo answers a validation batch it has seen from
/// the memo (other pixels under the same dataset indices give the first
/// batch's logits), and one without a memo, or in the lesson's BatchNorm
/// mode, runs the backbone again.
#[test]
fn the_validation_memo_answers_by_index_and_only_when_frozen() {
    use avp_train::{Classifier, HeadConfig, ValidMemo};
    use burn::tensor::{Distribution, Int, Tensor};
    use burn::train::InferenceStep;
    use std::sync::Arc;

    // It draws random images: not while a training test seeds and draws.
    let _serial = serial();
    let device = parse_device("flex").unwrap();
    let backbone = Arc::new(avp_model::Backbone::from(tiny_backbone(&device)));
    let head = HeadConfig::new()
        .init(backbone.num_features(), 2, &device)
        .unwrap();
    let batch = |seed: f64| avp_data::ImageBatch {
        images: Tensor::<4>::random([3, 3, 40, 48], Distribution::Uniform(-seed, seed), &device),
        targets: Tensor::<1, Int>::from_data([0i64, 1, 0], &device),
        indices: vec![4, 7, 9],
    };
    let logits = |c: &Classifier, b| values(InferenceStep::step(c, b).output);
    let (first, second) = (batch(1.0), batch(2.0));
    for (mode, stages) in [
        (BnMode::Frozen, None),
        (BnMode::Frozen, Some(avp_model::Stage::Layer4)),
        (BnMode::Lesson, None),
    ] {
        let memo = ValidMemo::new();
        let mut plain = Classifier::new(Arc::clone(&backbone), head.clone(), mode).unwrap();
        if let Some(first) = stages {
            plain = plain.with_trained_stages(first, &device);
        }
        let with_memo = plain.clone().with_valid_memo(memo.clone());
        let a = logits(&with_memo, first.clone());
        assert_eq!(a, logits(&plain, first.clone()), "{mode:?} {stages:?}");
        let b = logits(&with_memo, second.clone());
        let fresh = logits(&plain, second.clone());
        assert_ne!(
            a, fresh,
            "the two batches must differ for this test to mean anything"
        );
        if mode == BnMode::Frozen {
            assert_eq!(memo.len(), 3, "{stages:?}");
            assert_eq!(b, a, "{stages:?}: the memo answers seen indices");
        } else {
            assert!(memo.is_empty(), "the lesson's mode keeps nothing");
            assert_eq!(b, fresh);
        }
    }
}
