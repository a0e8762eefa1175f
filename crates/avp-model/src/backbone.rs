//! [`Backbone`]: a pretrained network with everything needed to run it
//! right, and the one place that decides *how* it runs.
//!
//! A [`ResNet`] is a plain Burn module. A `Backbone` owns one, as it was
//! stored, with its [`Provenance`] (file, format, SHA-256) and the input
//! [`Normalization`] it expects, and runs its headless forward pass with a
//! [`BatchNormUse`] (running statistics, batch statistics with PyTorch's
//! running update, or folded) on a set of [`Kernels`] (Burn's modules, or
//! the fused CPU path of [`crate::fused`] on flex). The folded network and
//! the fused packs are built once, on first use, per device, and shared by
//! every caller: the classifier, the feature cache, `classify`, `speed` and
//! the benches.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};

use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::batchnorm::{BatchNormUse, batch_norm, fold_batchnorm};
use crate::device::is_flex;
use crate::error::ModelError;
use crate::fused::FusedResNet;
use crate::normalization::Normalization;
use crate::resnet::{ResNet, ResNetConfig, Stage, global_pool};
use crate::weights::{LoadedModel, Provenance};

/// Which kernels run a backbone's forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Kernels {
    /// The fused CPU path on flex when the network's layer shapes allow
    /// it, Burn's modules otherwise (the default).
    #[default]
    Auto,
    /// Burn's own modules, on every device.
    Burn,
    /// The fused CPU path; a backbone that cannot use it (another device,
    /// an unsupported layer shape) is an error when it is made.
    Fused,
}

impl Kernels {
    /// The names accepted by [`Kernels::from_str`] (and `--kernels`).
    pub const NAMES: [&'static str; 3] = ["auto", "burn", "fused"];
}

impl FromStr for Kernels {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "burn" => Ok(Self::Burn),
            "fused" => Ok(Self::Fused),
            other => Err(ModelError::Unsupported(format!(
                "unknown kernels `{other}`: use one of {}",
                Self::NAMES.join(", ")
            ))),
        }
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Burn => "burn",
            Self::Fused => "fused",
        })
    }
}

/// The derived forms of the network on one device, built on first use.
struct Forms {
    device: Device,
    /// The network on this device (the stored one on its own device: the
    /// same parameters and running statistics).
    network: ResNet,
    /// The folded form (fused pack, or Burn's folded network): a snapshot
    /// of the running statistics, dropped when a batch-statistics pass
    /// moves them.
    folded: Mutex<Option<Arc<Folded>>>,
    /// The fused pack of the unfolded network (BatchNorm read at each
    /// call, so it never goes stale in a frozen backbone).
    fused_live: OnceLock<Option<FusedResNet>>,
}

/// A folded network's fused pack, when the kernels allow one, and Burn's
/// folded network where a pass needs it.
struct Folded {
    /// Made for the first pass on Burn's modules (no fused pack, or an
    /// input the pack refuses) and kept from then on; never made beside a
    /// fused pack that takes every pass, which holds the same weights
    /// packed (ResNet50's folded network alone is 94 MB, a quarter of the
    /// fused path's peak RSS at batch 1 when it was made).
    network: OnceLock<ResNet>,
    fused: Option<FusedResNet>,
}

impl Folded {
    /// Burn's folded network, folded from `stored` (the running
    /// statistics this snapshot was made from: a pass that moves them
    /// drops the snapshot) on first use.
    fn network(&self, stored: &ResNet) -> &ResNet {
        self.network.get_or_init(|| fold_batchnorm(stored))
    }
}

/// A pretrained, headless-capable network, where it came from, what input
/// it expects, and how it runs.
pub struct Backbone {
    network: ResNet,
    config: ResNetConfig,
    provenance: Provenance,
    normalization: Normalization,
    kernels: Kernels,
    forms: Mutex<Vec<Arc<Forms>>>,
}

impl fmt::Debug for Backbone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backbone")
            .field("config", &self.config.describe())
            .field("weights", &self.provenance.path)
            .field("kernels", &self.kernels)
            .finish_non_exhaustive()
    }
}

impl From<LoadedModel> for Backbone {
    fn from(m: LoadedModel) -> Self {
        Self::new(m.model, m.config, m.provenance, m.normalization)
    }
}

impl Backbone {
    /// A backbone from its parts; its network stays off the autodiff tape
    /// (`no_grad`), and runs on [`Kernels::Auto`].
    pub fn new(
        network: ResNet,
        config: ResNetConfig,
        provenance: Provenance,
        normalization: Normalization,
    ) -> Self {
        Self {
            network: network.no_grad(),
            config,
            provenance,
            normalization,
            kernels: Kernels::Auto,
            forms: Mutex::new(Vec::new()),
        }
    }

    /// A backbone made in memory (random weights, a test): provenance
    /// [`Provenance::in_memory`], ImageNet normalization.
    pub fn in_memory(network: ResNet, config: ResNetConfig) -> Self {
        let provenance = Provenance::in_memory(config.describe());
        Self::new(network, config, provenance, Normalization::imagenet())
    }

    /// The same backbone on other kernels. [`Kernels::Fused`] is refused
    /// when the network is not on flex or has a layer the fused path does
    /// not implement.
    pub fn with_kernels(mut self, kernels: Kernels) -> Result<Self, ModelError> {
        if kernels == Kernels::Fused {
            let device = self.device();
            if !is_flex(&device) {
                return Err(ModelError::Unsupported(format!(
                    "--kernels fused runs on the flex device only (this backbone is on {device:?}); \
                     use --kernels auto or burn"
                )));
            }
            if FusedResNet::new(&self.network, false).is_none() {
                return Err(ModelError::Unsupported(
                    "this network has a layer the fused path does not implement (grouped or dilated \
                     convolutions, `same` padding, a ceil-mode pool); use --kernels auto or burn"
                        .into(),
                ));
            }
        }
        self.kernels = kernels;
        self.forms = Mutex::new(Vec::new());
        Ok(self)
    }

    /// The network as stored (with its `fc` layer, if the file had one).
    pub fn network(&self) -> &ResNet {
        &self.network
    }

    /// Its architecture.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// Where its weights came from.
    pub fn provenance(&self) -> &Provenance {
        &self.provenance
    }

    /// The input normalization it expects.
    pub fn normalization(&self) -> &Normalization {
        &self.normalization
    }

    /// The kernels it runs on.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Width of the pooled features.
    pub fn num_features(&self) -> usize {
        self.network.num_features()
    }

    /// The device the stored network is on.
    pub fn device(&self) -> Device {
        self.network.conv1.weight.device()
    }

    /// The same backbone without its `fc` layer (what a new head replaces).
    pub fn headless(self) -> Self {
        let network = self.network.with_fc(None);
        Self {
            network,
            config: self.config.with_num_classes(None),
            forms: Mutex::new(Vec::new()),
            ..self
        }
    }

    /// Which kernels a pass with `bn` on `device` would use: `"fused"` or
    /// `"burn"` (for reports).
    pub fn kernels_for(&self, device: &Device, bn: BatchNormUse) -> &'static str {
        let forms = self.forms(device);
        let fused = match bn {
            BatchNormUse::Folded => self.folded(&forms).fused.is_some(),
            _ => self.fused_live(&forms).is_some(),
        };
        if fused { "fused" } else { "burn" }
    }

    /// Pooled features `[N, F]` of `images`, computed off the autodiff
    /// tape on the images' device, BatchNorm used as `bn` says. With
    /// [`BatchNormUse::Batch`] the running statistics of the stored network
    /// are updated (PyTorch's `model.train()`), and a folded form made
    /// before is dropped so that the next folded pass sees them.
    pub fn features(&self, images: Tensor<4>, bn: BatchNormUse) -> Tensor<2> {
        self.pass(
            images,
            bn,
            |fused, net, images| fused.forward_features(net, images, bn),
            |net, images| global_pool(feature_map(net, images, bn, usize::MAX)),
        )
    }

    /// The feature map entering `stage` (the images themselves for the
    /// stem), off the autodiff tape, on the device of `images`: the frozen
    /// prefix of a network whose later stages are fine-tuned. Runs as
    /// [`Backbone::features`] does (the folded network and the fused path
    /// where they apply).
    pub fn feature_map_before(
        &self,
        images: Tensor<4>,
        stage: Stage,
        bn: BatchNormUse,
    ) -> Tensor<4> {
        if stage == Stage::Stem {
            return images.without_autodiff();
        }
        let blocks = self.network.blocks_before(stage);
        self.pass(
            images,
            bn,
            |fused, net, images| fused.forward_map(net, images, bn, blocks),
            |net, images| feature_map(net, images, bn, blocks),
        )
    }

    /// One pass off the tape on the forms of the images' device: the
    /// folded form for [`BatchNormUse::Folded`], the network as stored
    /// otherwise. `fused` runs the fused pack where there is one, given
    /// the stored network (an unfolded pack reads its BatchNorm layers
    /// there, a folded one reads none); `burn` runs Burn's modules where
    /// there is no pack or the pack refuses the input (`None`). A
    /// [`BatchNormUse::Batch`] pass moves the running statistics, so the
    /// folded snapshot is dropped.
    fn pass<T>(
        &self,
        images: Tensor<4>,
        bn: BatchNormUse,
        fused: impl FnOnce(&FusedResNet, &ResNet, Tensor<4>) -> Option<T>,
        burn: impl FnOnce(&ResNet, Tensor<4>) -> T,
    ) -> T {
        let images = images.without_autodiff();
        let forms = self.forms(&images.device());
        let out = match bn {
            BatchNormUse::Folded => {
                let folded = self.folded(&forms);
                let packed = (folded.fused.as_ref())
                    .and_then(|pack| fused(pack, &forms.network, images.clone()));
                match packed {
                    Some(out) => out,
                    None => burn(folded.network(&forms.network), images),
                }
            }
            _ => {
                let packed = (self.fused_live(&forms))
                    .and_then(|pack| fused(pack, &forms.network, images.clone()));
                match packed {
                    Some(out) => out,
                    None => burn(&forms.network, images),
                }
            }
        };
        if bn == BatchNormUse::Batch {
            *forms.folded.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        out
    }

    /// Logits of the stored `fc` layer (ImageNet's, for a full network),
    /// or the pooled features of a headless one: [`ResNet::forward`] run
    /// as this backbone runs.
    pub fn forward(&self, images: Tensor<4>, bn: BatchNormUse) -> Tensor<2> {
        let features = self.features(images, bn);
        match &self.network.fc {
            Some(fc) => fc.clone().to_device(&features.device()).forward(features),
            None => features,
        }
    }

    /// Refuses input sizes at which this network would not compute what its
    /// source file computes (see [`ResNet::check_input_size`]).
    pub fn check_input_size(&self, height: usize, width: usize) -> Result<(), ModelError> {
        self.network.check_input_size(height, width)
    }

    /// The forms on `device`, made on first use.
    fn forms(&self, device: &Device) -> Arc<Forms> {
        let device = device.clone().without_autodiff();
        let mut all = self.forms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = all.iter().find(|f| f.device == device) {
            return Arc::clone(f);
        }
        let network = if device == self.device() {
            self.network.clone()
        } else {
            self.network.clone().to_device(&device)
        };
        let forms = Arc::new(Forms {
            device,
            network,
            folded: Mutex::new(None),
            fused_live: OnceLock::new(),
        });
        all.push(Arc::clone(&forms));
        forms
    }

    /// Whether the fused path may run on `device`: the one place it is
    /// chosen.
    fn fused_allowed(&self, device: &Device) -> bool {
        self.kernels != Kernels::Burn && is_flex(device)
    }

    /// The folded form on the forms' device, made on first use (and again
    /// after a batch-statistics pass).
    fn folded(&self, forms: &Forms) -> Arc<Folded> {
        let mut slot = forms.folded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = slot.as_ref() {
            return Arc::clone(f);
        }
        // Packed conv by conv: Burn's folded network is made only where a
        // pass needs it ([`Folded::network`]).
        let fused = self
            .fused_allowed(&forms.device)
            .then(|| FusedResNet::folding(&forms.network))
            .flatten();
        let folded = Arc::new(Folded {
            network: OnceLock::new(),
            fused,
        });
        *slot = Some(Arc::clone(&folded));
        folded
    }

    /// The fused pack of the unfolded network, when allowed.
    fn fused_live<'a>(&self, forms: &'a Forms) -> Option<&'a FusedResNet> {
        if !self.fused_allowed(&forms.device) {
            return None;
        }
        forms
            .fused_live
            .get_or_init(|| FusedResNet::new(&forms.network, false))
            .as_ref()
    }
}

/// The feature map after the stem and the first `blocks` residual blocks
/// (all of them: the map before pooling), through Burn's modules,
/// BatchNorm used as `bn` says.
fn feature_map(net: &ResNet, images: Tensor<4>, bn: BatchNormUse, blocks: usize) -> Tensor<4> {
    let x = relu(batch_norm(&net.bn1, net.conv1.forward(images), bn));
    let mut x = net.maxpool.forward(x);
    for block in net.blocks().take(blocks) {
        x = block.forward_with(x, bn);
    }
    x
}

#[cfg(all(test, feature = "flex"))]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::resnet::BlockKind;

    fn tiny() -> (ResNet, ResNetConfig) {
        let cfg = ResNetConfig::new(BlockKind::Basic, [1, 1, 1, 1])
            .with_widths([4, 4, 8, 8])
            .with_stem_width(4);
        (cfg.init(&Device::flex()), cfg)
    }

    #[test]
    fn kernels_parse_and_fused_is_refused_where_it_cannot_run() {
        assert_eq!("Fused".parse::<Kernels>().unwrap(), Kernels::Fused);
        assert_eq!(" burn ".parse::<Kernels>().unwrap(), Kernels::Burn);
        let e = "fast".parse::<Kernels>().unwrap_err().to_string();
        assert!(e.contains("auto, burn, fused"), "{e}");
        let (net, cfg) = tiny();
        assert!(
            Backbone::in_memory(net, cfg.clone())
                .with_kernels(Kernels::Fused)
                .is_ok()
        );
        #[cfg(feature = "ndarray")]
        {
            #[allow(deprecated)]
            let device = Device::ndarray();
            let net = cfg.init(&device);
            let e = Backbone::in_memory(net, cfg.clone())
                .with_kernels(Kernels::Fused)
                .unwrap_err()
                .to_string();
            assert!(e.contains("flex device only"), "{e}");
        }
    }

    #[test]
    fn each_device_gets_its_own_forms_and_the_same_features() {
        let (net, cfg) = tiny();
        let backbone = Backbone::in_memory(net, cfg);
        let x = Tensor::<4>::random(
            [2, 3, 64, 64],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &Device::flex(),
        );
        let flex = backbone.features(x.clone(), BatchNormUse::Folded);
        // Asked twice: the forms are made once.
        let again = backbone.features(x.clone(), BatchNormUse::Folded);
        assert_eq!(
            flex.clone().into_data().try_to_vec::<f32>().unwrap(),
            again.into_data().try_to_vec::<f32>().unwrap()
        );
        assert_eq!(backbone.forms.lock().unwrap().len(), 1);
        #[cfg(feature = "ndarray")]
        {
            #[allow(deprecated)]
            let device = Device::ndarray();
            let other = backbone.features(x.to_device(&device), BatchNormUse::Folded);
            assert_eq!(backbone.forms.lock().unwrap().len(), 2);
            assert_eq!(backbone.kernels_for(&device, BatchNormUse::Folded), "burn");
            let a = flex.into_data().try_to_vec::<f32>().unwrap();
            let b = other.into_data().try_to_vec::<f32>().unwrap();
            let diff = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-4,
                "flex (fused) vs ndarray (Burn's modules): {diff}"
            );
        }
    }

    fn max_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
        let a = a.into_data().try_to_vec::<f32>().unwrap();
        let b = b.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn a_frozen_prefix_and_the_stages_after_it_give_the_whole_network() {
        let cfg = ResNetConfig::new(BlockKind::Bottleneck, [1, 2, 1, 2])
            .with_widths([4, 4, 8, 8])
            .with_stem_width(8)
            .with_num_classes(None);
        let net = cfg.init(&Device::flex());
        let x = Tensor::<4>::random(
            [2, 3, 64, 64],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &Device::flex(),
        );
        for kernels in [Kernels::Fused, Kernels::Burn] {
            let backbone = Backbone::in_memory(net.clone(), cfg.clone())
                .with_kernels(kernels)
                .unwrap();
            let whole = backbone.features(x.clone(), BatchNormUse::Running);
            for stage in Stage::ALL {
                let prefix = backbone.feature_map_before(x.clone(), stage, BatchNormUse::Folded);
                let tail = net.stages_from(stage);
                assert_eq!(tail.first(), Some(stage));
                let ours = global_pool(tail.forward_map(prefix, BatchNormUse::Running));
                let d = max_diff(whole.clone(), ours);
                assert!(d < 1e-4, "{kernels}, from {stage}: {d}");
            }
        }
        // Putting the stages back gives the same network.
        let back = net
            .clone()
            .with_stages(net.stages_from(Stage::Layer3))
            .unwrap();
        assert_eq!(back.blocks().count(), net.blocks().count());
        let other = ResNetConfig::new(BlockKind::Bottleneck, [1, 2, 1, 2])
            .with_widths([4, 4, 16, 8])
            .with_stem_width(8)
            .init(&Device::flex());
        let e = net
            .with_stages(other.stages_from(Stage::Layer3))
            .unwrap_err();
        assert!(e.to_string().contains("layer3"), "{e}");
    }
}
