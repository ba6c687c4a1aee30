//! Reward-model training: a linear classification head on pooled encoder states, then
//! optionally LoRA on the encoder together with the head.
//!
//! 1. The examples are split into train and held-out sets (seeded shuffle,
//!    [`TrainConfig::val_fraction`] held out) and tokenized (truncated to the position table).
//! 2. Head stage: the frozen encoder's pooled states are computed once; a fresh
//!    `Linear(H, 2)` (torch init, seeded) is trained on them with AdamW and cross-entropy
//!    in shuffled minibatches. After every epoch the held-out loss and accuracy are measured;
//!    training stops when the held-out loss has not improved for `patience` epochs, and the
//!    best epoch's head is kept.
//! 3. LoRA stage (when [`TrainConfig::lora`] is set): adapters on the targeted encoder
//!    layers (B = 0, so training starts from the head stage's model) and the head are
//!    trained together through the encoder, minibatches grouped by length; the same
//!    per-epoch measurement, early stopping and best-epoch restore.
//!
//! Data parallel (a [`Collective`] of N ranks, `mpirun -np N lathe reward-train`): the
//! encoder passes are shared out by batch (the pooled states, every held-out measurement;
//! batch j is rank j mod N's, the same batches as one process, gathered in order), the head
//! stage on the cached states is cheap and runs whole on every rank, and each LoRA-stage
//! minibatch is cut into N contiguous parts whose gradients are summed in rank order. The
//! pooled states and the held-out figures are one process's bits; the LoRA stage equals it
//! to f32 rounding (a part's rows go through the encoder in a smaller batch).
//!
//! Labels: 0 = NEGATIVE, 1 = POSITIVE; the reward is the POSITIVE logit. No dropout is used
//! in the encoder (transformers would apply hidden/attention dropout 0.1 in train mode).

use std::path::{Path, PathBuf};
use std::time::Instant;

use lathe_core::collective::{all_reduce_grads, sum_in_rank_order};
use lathe_core::{Adam, AdamConfig, Collective, Device, Solo, Tensor};
use lathe_lora::config::TargetModules;
use lathe_lora::{AdapterSwitch, LoraConfig};
use lathe_models::tokenizer::Tokenizer;

use crate::config::{Architecture, EncoderConfig, Pooling};
use crate::data::{holdout_split, Example, SplitMix64, LABELS};
use crate::encoder::Encoder;
use crate::head::Head;
use crate::model::{encode_ids, read_tokenizer, read_weights, Encoded, RewardModel};
use crate::{Error, Result};

/// LoRA on the encoder.
#[derive(Clone, Debug)]
pub struct LoraSettings {
    /// LoRA rank (>= 1).
    pub r: usize,
    /// Scale numerator: the update is scaled by alpha / r.
    pub alpha: f64,
    /// Module names (peft matching); empty: the attention query and value projections
    /// (BERT `query`, `value`; DistilBERT `q_lin`, `v_lin`).
    pub targets: Vec<String>,
    /// Learning rate of the LoRA stage.
    pub lr: f32,
    /// Epochs of the LoRA stage (after the head stage).
    pub epochs: usize,
    /// Examples per step of the LoRA stage.
    pub batch_size: usize,
}

impl Default for LoraSettings {
    fn default() -> Self {
        LoraSettings {
            r: 8,
            alpha: 16.0,
            targets: Vec::new(),
            lr: 5e-4,
            epochs: 3,
            batch_size: 16,
        }
    }
}

/// Training settings.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Head-stage epochs (cheap: the encoder runs once).
    pub epochs: usize,
    /// Examples per step of the head stage.
    pub batch_size: usize,
    /// Learning rate of the head stage.
    pub lr: f32,
    /// AdamW weight decay of the head stage.
    pub weight_decay: f32,
    /// Fraction of the examples held out for loss/accuracy and early stopping.
    pub val_fraction: f32,
    /// Epochs without a better held-out loss before stopping (0: never stop early).
    pub patience: usize,
    /// Seed of the held-out split, the batch orders, the head's and adapters' init.
    pub seed: u64,
    /// How token states are pooled for the head.
    pub pooling: Pooling,
    /// A LoRA stage on the encoder after the head stage (None: head only).
    pub lora: Option<LoraSettings>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 100,
            batch_size: 32,
            lr: 3e-3,
            weight_decay: 0.01,
            val_fraction: 0.1,
            patience: 10,
            seed: 0,
            pooling: Pooling::Mean,
            lora: None,
        }
    }
}

/// One epoch's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochStats {
    /// "head" or "lora".
    pub stage: &'static str,
    /// From 1 within the stage.
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub train_loss: f32,
    /// Training accuracy over the epoch, in [0, 1].
    pub train_accuracy: f32,
    /// NaN when nothing is held out.
    pub val_loss: f32,
    /// Held-out accuracy (NaN when nothing is held out).
    pub val_accuracy: f32,
    /// Wall-clock seconds of the epoch.
    pub seconds: f32,
}

impl EpochStats {
    /// One JSON line (metrics.jsonl).
    pub fn to_json(&self) -> serde_json::Value {
        let num = |x: f32| {
            if x.is_finite() {
                serde_json::json!(x)
            } else {
                serde_json::Value::Null
            }
        };
        serde_json::json!({
            "stage": self.stage,
            "epoch": self.epoch,
            "train_loss": num(self.train_loss),
            "train_accuracy": num(self.train_accuracy),
            "val_loss": num(self.val_loss),
            "val_accuracy": num(self.val_accuracy),
            "seconds": self.seconds,
        })
    }
}

/// What training did.
#[derive(Clone, Debug)]
pub struct TrainReport {
    /// Every epoch of both stages, in order.
    pub epochs: Vec<EpochStats>,
    /// Per stage: the epoch whose weights were kept.
    pub best_head_epoch: usize,
    /// The LoRA stage's kept epoch (None without a LoRA stage).
    pub best_lora_epoch: Option<usize>,
    /// Whether a stage stopped before its last epoch.
    pub stopped_early: bool,
    /// Examples trained on.
    pub train_examples: usize,
    /// Examples held out.
    pub val_examples: usize,
    /// Texts truncated to the position table.
    pub truncated: usize,
    /// LoRA layers adapted.
    pub lora_layers: usize,
}

/// Loss and accuracy of a model on labelled examples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// Mean cross-entropy loss.
    pub loss: f32,
    /// Fraction classified right, in [0, 1].
    pub accuracy: f32,
    /// Examples evaluated.
    pub examples: usize,
}

/// Minibatches of indices into `lengths`: a seeded shuffle, then within windows of 8
/// batches sorted by length (less padding), then the batches shuffled.
fn length_batches(lengths: &[usize], batch: usize, rng: &mut SplitMix64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut order);
    let mut batches = Vec::new();
    for window in order.chunks(batch * 8) {
        let mut window = window.to_vec();
        window.sort_by_key(|&i| lengths[i]);
        batches.extend(window.chunks(batch).map(<[usize]>::to_vec));
    }
    rng.shuffle(&mut batches);
    batches
}

/// Indices sorted by length, in batches (for inference).
pub(crate) fn sorted_batches(lengths: &[usize], batch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    order.chunks(batch).map(<[usize]>::to_vec).collect()
}

/// Summed cross-entropy and correct count of logits (B, 2) against labels.
fn loss_and_correct(logits: &Tensor, labels: &[u32]) -> Result<(f32, usize)> {
    let targets = Tensor::from_vec(labels.to_vec(), &[labels.len()], logits.device())?;
    let loss = logits.cross_entropy(&targets, None)?.to_scalar()? * labels.len() as f32;
    Ok((loss, correct(logits, labels)?))
}

fn correct(logits: &Tensor, labels: &[u32]) -> Result<usize> {
    let width = logits.shape()[1];
    let values = logits.to_vec_f32()?;
    Ok(values
        .chunks(width)
        .zip(labels)
        .filter(|(row, &label)| argmax(row) == label as usize)
        .count())
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0
}

/// Loss and accuracy (argmax of the logits equal to the label index) of `model` on
/// `examples`, in length-sorted batches.
pub fn evaluate(model: &RewardModel, examples: &[Example]) -> Result<Evaluation> {
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let ids = model.encode(&texts)?.ids;
    let labels: Vec<u32> = examples.iter().map(|e| e.label).collect();
    evaluate_ids(model, &ids, &labels, &Solo)
}

/// [`evaluate`] shared by the ranks of `collective` (batch j is rank j mod N's; the
/// figures are added in batch order: one process's bits).
pub fn evaluate_on_ranks(
    model: &RewardModel,
    examples: &[Example],
    collective: &dyn Collective,
) -> Result<Evaluation> {
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let ids = model.encode(&texts)?.ids;
    let labels: Vec<u32> = examples.iter().map(|e| e.label).collect();
    evaluate_ids(model, &ids, &labels, collective)
}

/// [`evaluate`] on token ids already encoded.
fn evaluate_ids(
    model: &RewardModel,
    ids: &[Vec<u32>],
    labels: &[u32],
    collective: &dyn Collective,
) -> Result<Evaluation> {
    if ids.is_empty() {
        return Ok(Evaluation {
            loss: f32::NAN,
            accuracy: f32::NAN,
            examples: 0,
        });
    }
    let _no_grad = lathe_core::no_grad();
    let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
    let batches = sorted_batches(&lengths, model.batch_size.max(1));
    let (rank, ranks) = (collective.rank(), collective.size());
    // (batches, 2): summed loss and correct count of this rank's batches, 0 elsewhere.
    let mut figures = vec![0.0f64; 2 * batches.len()];
    for (j, batch) in batches.iter().enumerate() {
        if j % ranks != rank {
            continue;
        }
        let rows: Vec<Vec<u32>> = batch.iter().map(|&i| ids[i].clone()).collect();
        let batch_labels: Vec<u32> = batch.iter().map(|&i| labels[i]).collect();
        let (l, c) = loss_and_correct(&model.logits_ids(&rows)?, &batch_labels)?;
        figures[2 * j] = l as f64;
        figures[2 * j + 1] = c as f64;
    }
    let all = collective.all_gather_f64(&figures)?;
    let (mut loss, mut right) = (0.0f64, 0usize);
    for j in 0..batches.len() {
        let at = (j % ranks) * figures.len() + 2 * j;
        loss += all[at];
        right += all[at + 1] as usize;
    }
    Ok(Evaluation {
        loss: (loss / ids.len() as f64) as f32,
        accuracy: right as f32 / ids.len() as f32,
        examples: ids.len(),
    })
}

/// Texts per encoder pass when the head stage's pooled states are computed.
pub const FEATURE_BATCH: usize = 64;

/// Texts per pass when the trained model scores the held-out set (and, as its batch size,
/// anything after training).
pub const EVAL_BATCH: usize = 16;

/// Pooled states (N, H) of every row of `ids`, in order, on the model's device. With
/// several ranks, batch j is rank j mod N's and every rank gathers all rows.
fn pooled_features(
    model: &RewardModel,
    ids: &[Vec<u32>],
    pooling: Pooling,
    collective: &dyn Collective,
) -> Result<Tensor> {
    let _no_grad = lathe_core::no_grad();
    let h = model.config().hidden;
    let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
    let batches = sorted_batches(&lengths, FEATURE_BATCH);
    let (rank, ranks) = (collective.rank(), collective.size());
    let mut features = vec![0.0f32; ids.len() * h];
    for (j, batch) in batches.iter().enumerate() {
        if j % ranks != rank {
            continue;
        }
        let rows: Vec<Vec<u32>> = batch.iter().map(|&i| ids[i].clone()).collect();
        let pooled = model.pooled_ids(&rows, pooling)?.to_vec_f32()?;
        for (k, &i) in batch.iter().enumerate() {
            features[i * h..(i + 1) * h].copy_from_slice(&pooled[k * h..(k + 1) * h]);
        }
    }
    if ranks > 1 {
        // (ranks, N, H): each rank's rows filled; every row taken from the rank that made it.
        let all = collective.all_gather_f32(&features)?;
        for (j, batch) in batches.iter().enumerate() {
            let from = &all[(j % ranks) * features.len()..];
            for &i in batch {
                features[i * h..(i + 1) * h].copy_from_slice(&from[i * h..(i + 1) * h]);
            }
        }
    }
    Ok(Tensor::from_vec(features, &[ids.len(), h], model.device())?)
}

/// Tracks the best held-out loss for early stopping.
struct EarlyStop {
    best: f32,
    best_epoch: usize,
    patience: usize,
    since: usize,
}

impl EarlyStop {
    fn new(patience: usize) -> EarlyStop {
        EarlyStop {
            best: f32::INFINITY,
            best_epoch: 0,
            patience,
            since: 0,
        }
    }

    /// Records an epoch; returns (is the best so far, stop now).
    fn record(&mut self, epoch: usize, val_loss: f32) -> (bool, bool) {
        // Without a held-out set every epoch counts as the best (the last one is kept).
        if !val_loss.is_finite() || val_loss < self.best {
            self.best = if val_loss.is_finite() {
                val_loss
            } else {
                self.best
            };
            self.best_epoch = epoch;
            self.since = 0;
            return (true, false);
        }
        self.since += 1;
        (false, self.patience > 0 && self.since >= self.patience)
    }
}

/// The largest batch size or epoch count accepted (2^20).
pub const MAX_COUNT: usize = 1 << 20;

fn check_config(config: &TrainConfig) -> Result<()> {
    let fail = |m: String| Err(Error::Config(m));
    let mut counts = vec![("epochs", config.epochs), ("batch size", config.batch_size)];
    let mut rates = vec![("learning rate", config.lr)];
    if let Some(lora) = &config.lora {
        counts.extend([
            ("LoRA epochs", lora.epochs),
            ("LoRA batch size", lora.batch_size),
        ]);
        rates.push(("LoRA learning rate", lora.lr));
        if !(lora.alpha.is_finite() && lora.alpha > 0.0) {
            return fail(format!(
                "LoRA alpha must be finite and > 0, got {}",
                lora.alpha
            ));
        }
        if lora.r == 0 {
            return fail("LoRA r must be >= 1".into());
        }
    }
    for (name, v) in counts {
        if !(1..=MAX_COUNT).contains(&v) {
            return fail(format!("{name} must be in 1..={MAX_COUNT}, got {v}"));
        }
    }
    for (name, v) in rates {
        if !(v.is_finite() && v > 0.0) {
            return fail(format!("{name} must be finite and > 0, got {v}"));
        }
    }
    if !(config.weight_decay.is_finite() && config.weight_decay >= 0.0) {
        return fail(format!(
            "weight decay must be finite and >= 0, got {}",
            config.weight_decay
        ));
    }
    if !(0.0..1.0).contains(&config.val_fraction) {
        return fail(format!(
            "the held-out fraction must be in [0, 1), got {}",
            config.val_fraction
        ));
    }
    Ok(())
}

/// Stops training at the first non-finite loss or parameter: `stage` and `epoch` name
/// where, nothing is saved.
fn check_finite(stage: &str, epoch: usize, loss: f32, params: &[Tensor]) -> Result<()> {
    let what = if !loss.is_finite() {
        format!("the loss is {loss}")
    } else if let Some(i) = lathe_core::first_diverged(params)? {
        format!("trainable parameter {i} holds NaN/inf or a value beyond 1.8e19 after the update")
    } else {
        return Ok(());
    };
    Err(Error::Config(format!(
        "{stage} stage, epoch {epoch}: {what}; stopping without saving (the learning rate is \
         likely too high, or a setting is NaN/inf)"
    )))
}

/// Training data tokenized for an encoder whose weights are not read yet: what
/// [`train_prepared`] trains on, and what [`crate::plan::training_plan`] plans the memory
/// of before anything large is loaded.
#[derive(Debug)]
pub struct Prepared {
    pub(crate) dir: PathBuf,
    pub(crate) encoder: EncoderConfig,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) config: TrainConfig,
    pub(crate) train_ids: Vec<Vec<u32>>,
    pub(crate) train_labels: Vec<u32>,
    pub(crate) val_ids: Vec<Vec<u32>>,
    pub(crate) val_labels: Vec<u32>,
    /// Bytes of the examples' texts (held by the caller and by the split).
    pub(crate) text_bytes: u64,
    pub(crate) truncated: usize,
}

impl Prepared {
    /// sha256 of the tokenized training and held-out examples and their labels: the data as
    /// training sees it (another file, split or tokenizer shows as a difference).
    pub fn fingerprint(&self) -> String {
        let mut bytes = Vec::new();
        for (ids, labels) in [
            (&self.train_ids, &self.train_labels),
            (&self.val_ids, &self.val_labels),
        ] {
            bytes.extend((ids.len() as u64).to_le_bytes());
            for (row, label) in ids.iter().zip(labels) {
                bytes.extend(label.to_le_bytes());
                bytes.extend((row.len() as u64).to_le_bytes());
                bytes.extend(row.iter().flat_map(|t| t.to_le_bytes()));
            }
        }
        lathe_train::resume::bytes_fingerprint(&bytes)
    }

    /// The encoder's config.json.
    pub fn encoder_config(&self) -> &EncoderConfig {
        &self.encoder
    }

    /// The training settings.
    pub fn train_config(&self) -> &TrainConfig {
        &self.config
    }

    /// Token counts of `texts` as the trained model will see them (truncated to the
    /// position table): the lengths of a test set, for the plan.
    pub fn token_lengths(&self, texts: &[&str]) -> Result<Vec<usize>> {
        let encoded = encode_ids(&self.tokenizer, self.encoder.max_positions, texts)?;
        Ok(encoded.ids.iter().map(Vec::len).collect())
    }
}

/// Checks the settings and the examples, reads the encoder's config and tokenizer (not its
/// weights), splits the examples into train and held-out sets and tokenizes both.
pub fn prepare(
    encoder_dir: impl AsRef<Path>,
    examples: &[Example],
    config: &TrainConfig,
) -> Result<Prepared> {
    let dir = encoder_dir.as_ref();
    check_config(config)?;
    if let Some(bad) = examples.iter().find(|e| e.label > 1) {
        return Err(Error::Config(format!(
            "label {} of {:?} is not binary",
            bad.label, bad.text
        )));
    }
    for label in 0..2 {
        if !examples.iter().any(|e| e.label == label) {
            return Err(Error::Config(format!(
                "the training data has no example labelled {label} ({}): both classes are needed",
                LABELS[label as usize]
            )));
        }
    }
    let encoder = EncoderConfig::from_dir(dir)?;
    if let Some(lora) = &config.lora {
        // Every encoder linear is at least hidden wide: refuse a rank above it now rather
        // than after the head stage.
        let width = encoder.hidden;
        if lora.r > width {
            return Err(Error::Config(format!(
                "LoRA r = {} exceeds the encoder's hidden size {width}: give r in 1..={width}",
                lora.r
            )));
        }
    }
    let tokenizer = read_tokenizer(dir, &encoder)?;
    let (train_set, val_set) = holdout_split(examples, config.val_fraction, config.seed)?;
    let encode = |set: &[Example]| -> Result<Encoded> {
        let texts: Vec<&str> = set.iter().map(|e| e.text.as_str()).collect();
        encode_ids(&tokenizer, encoder.max_positions, &texts)
    };
    let train = encode(&train_set)?;
    let val = encode(&val_set)?;
    let truncated = train.truncated + val.truncated;
    if truncated > 0 {
        eprintln!(
            "lathe-reward: {truncated} text(s) longer than the encoder's {} positions were \
             truncated to them",
            encoder.max_positions
        );
    }
    Ok(Prepared {
        dir: dir.to_path_buf(),
        encoder,
        tokenizer,
        config: config.clone(),
        train_ids: train.ids,
        train_labels: train_set.iter().map(|e| e.label).collect(),
        val_ids: val.ids,
        val_labels: val_set.iter().map(|e| e.label).collect(),
        text_bytes: examples.iter().map(|e| e.text.len() as u64).sum(),
        truncated,
    })
}

/// Trains a binary sentiment reward model on the encoder in `encoder_dir` (see the module
/// docs): [`prepare`], then [`train_prepared`]. `on_epoch` sees each epoch's figures as they
/// come. Returns the model (its head and merged-on-save adapters) and the report.
pub fn train(
    encoder_dir: impl AsRef<Path>,
    examples: &[Example],
    config: &TrainConfig,
    device: &Device,
    on_epoch: &mut dyn FnMut(&EpochStats),
) -> Result<(RewardModel, TrainReport)> {
    train_prepared(prepare(encoder_dir, examples, config)?, device, on_epoch)
}

/// Loads the encoder's weights onto `device` (one tensor at a time) and trains on the
/// prepared data.
pub fn train_prepared(
    prepared: Prepared,
    device: &Device,
    on_epoch: &mut dyn FnMut(&EpochStats),
) -> Result<(RewardModel, TrainReport)> {
    train_prepared_on_ranks(prepared, device, on_epoch, &Solo)
}

/// [`train_prepared`] as one of the ranks of `collective` (see the module's docs): every
/// rank must be given the same prepared data and settings, and ends with the same model.
pub fn train_prepared_on_ranks(
    prepared: Prepared,
    device: &Device,
    on_epoch: &mut dyn FnMut(&EpochStats),
    collective: &dyn Collective,
) -> Result<(RewardModel, TrainReport)> {
    let Prepared {
        dir,
        encoder,
        tokenizer,
        config,
        train_ids,
        train_labels: labels,
        val_ids,
        val_labels,
        truncated,
        ..
    } = prepared;
    let mut weights = read_weights(&dir, device)?;
    let encoder = Encoder::load(&mut weights, &encoder)?;
    // An encoder-only model (any head in the directory is ignored: training makes a new one).
    let mut model = RewardModel::from_parts(
        encoder,
        None,
        tokenizer,
        LABELS.iter().map(|s| s.to_string()).collect(),
        1,
        config.pooling,
        dir,
    );
    model.set_batch_size(EVAL_BATCH)?;
    let mut report = TrainReport {
        epochs: Vec::new(),
        best_head_epoch: 0,
        best_lora_epoch: None,
        stopped_early: false,
        train_examples: train_ids.len(),
        val_examples: val_ids.len(),
        truncated,
        lora_layers: 0,
    };
    let val_count = val_ids.len();

    // Head stage on cached pooled states.
    let h = model.config().hidden;
    let features = pooled_features(&model, &train_ids, config.pooling, collective)?;
    let val_features = if val_ids.is_empty() {
        None
    } else {
        Some(pooled_features(
            &model,
            &val_ids,
            config.pooling,
            collective,
        )?)
    };
    let head = Head::new_linear(
        h,
        2,
        config.pooling,
        lathe_core::seed::derive(config.seed, 0x4ead, 0),
        device,
    )?;
    let mut optimizer = Adam::new(
        head.variables(),
        AdamConfig::adamw(config.lr, config.weight_decay),
    )?;
    let mut rng = SplitMix64::new(lathe_core::seed::derive(config.seed, 0xba7c, 0));
    let mut stop = EarlyStop::new(config.patience);
    let mut best_head = head.snapshot()?;
    let lengths_one = vec![1usize; train_ids.len()];
    for epoch in 1..=config.epochs {
        let start = Instant::now();
        let (mut loss_sum, mut right) = (0.0f64, 0usize);
        for batch in length_batches(&lengths_one, config.batch_size, &mut rng) {
            let idx: Vec<u32> = batch.iter().map(|&i| i as u32).collect();
            let idx = Tensor::from_vec(idx, &[batch.len()], device)?;
            let x = Tensor::embedding(&features, &idx)?; // (b, H)
            let logits = head.forward_pooled(&x)?;
            let targets: Vec<u32> = batch.iter().map(|&i| labels[i]).collect();
            let target_t = Tensor::from_vec(targets.clone(), &[batch.len()], device)?;
            let loss = logits.cross_entropy(&target_t, None)?;
            let grads = loss.backward()?;
            optimizer.step(&grads)?;
            let loss_value = loss.to_scalar()?;
            check_finite("head", epoch, loss_value, optimizer.params())?;
            loss_sum += loss_value as f64 * batch.len() as f64;
            right += correct(&logits.detach(), &targets)?;
        }
        let (val_loss, val_accuracy) = match &val_features {
            Some(vf) => {
                let _no_grad = lathe_core::no_grad();
                let (l, c) = loss_and_correct(&head.forward_pooled(vf)?, &val_labels)?;
                (l / val_count as f32, c as f32 / val_count as f32)
            }
            None => (f32::NAN, f32::NAN),
        };
        let stats = EpochStats {
            stage: "head",
            epoch,
            train_loss: (loss_sum / train_ids.len() as f64) as f32,
            train_accuracy: right as f32 / train_ids.len() as f32,
            val_loss,
            val_accuracy,
            seconds: start.elapsed().as_secs_f32(),
        };
        on_epoch(&stats);
        report.epochs.push(stats);
        let (best, halt) = stop.record(epoch, val_loss);
        if best {
            best_head = head.snapshot()?;
        }
        if halt {
            report.stopped_early = epoch < config.epochs;
            break;
        }
    }
    report.best_head_epoch = stop.best_epoch;
    let head_val_loss = stop.best;
    model.head = Some(best_head);

    if let Some(lora) = &config.lora {
        train_lora(
            &mut model,
            lora,
            &config,
            (&train_ids, &labels),
            (&val_ids, &val_labels),
            head_val_loss,
            &mut report,
            on_epoch,
            collective,
        )?;
    }
    Ok((model, report))
}

/// The peft config of the LoRA stage: `lora`'s targets, or the attention query and value
/// projections of `architecture` when it names none.
pub(crate) fn lora_config(architecture: Architecture, lora: &LoraSettings) -> LoraConfig {
    let targets: Vec<String> = if lora.targets.is_empty() {
        match architecture {
            Architecture::Bert => vec!["query".into(), "value".into()],
            Architecture::DistilBert => vec!["q_lin".into(), "v_lin".into()],
        }
    } else {
        lora.targets.clone()
    };
    let mut config = LoraConfig::new(lora.r, lora.alpha, &[]);
    config.task_type = Some("SEQ_CLS".into());
    config.target_modules = TargetModules::List(targets);
    config
}

/// The LoRA stage: adapters + head trained through the encoder.
#[allow(clippy::too_many_arguments)]
fn train_lora(
    model: &mut RewardModel,
    lora: &LoraSettings,
    config: &TrainConfig,
    (ids, labels): (&[Vec<u32>], &[u32]),
    (val_ids, val_labels): (&[Vec<u32>], &[u32]),
    head_val_loss: f32,
    report: &mut TrainReport,
    on_epoch: &mut dyn FnMut(&EpochStats),
    collective: &dyn Collective,
) -> Result<()> {
    let device = model.device().clone();
    let (rank, ranks) = (collective.rank(), collective.size());
    let lora_config = lora_config(model.config().architecture, lora);
    let switch = AdapterSwitch::new();
    report.lora_layers = model.encoder.add_lora(
        &lora_config,
        &switch,
        lathe_core::seed::derive(config.seed, 0x10a, 0),
    )?;
    // The head continues from the head stage, as trainable variables again.
    let head = model.head.take().expect("head stage ran");
    let (w, b) = match &head {
        Head::Linear { classifier, .. } => classifier.dense_parts()?,
        Head::DistilBert { .. } => unreachable!("training makes linear heads"),
    };
    let head = Head::Linear {
        pooling: config.pooling,
        classifier: lathe_models::linear::Linear::dense(
            w.affine(1.0, 0.0)?.detach().into_variable(),
            b.map(|b| b.affine(1.0, 0.0).map(|t| t.detach().into_variable()))
                .transpose()?,
        )?,
    };
    model.head = Some(head);
    let mut params = model.encoder.variables();
    params.extend(model.head.as_ref().expect("set").variables());
    let mut optimizer = Adam::new(params, AdamConfig::adamw(lora.lr, 0.0))?;
    let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
    let mut rng = SplitMix64::new(lathe_core::seed::derive(config.seed, 0x10a_ba7c, 0));
    let patience = if config.patience == 0 {
        0
    } else {
        config.patience.min(2)
    };
    let mut stop = EarlyStop::new(patience);
    // Epoch 0 is the head stage's model (B = 0): LoRA epochs must beat it to be kept.
    stop.best = head_val_loss;
    let snapshot = |model: &mut RewardModel| -> Result<(Head, Vec<(Tensor, Tensor)>)> {
        let head = model.head.as_ref().expect("set").snapshot()?;
        let _no_grad = lathe_core::no_grad();
        let adapters = model
            .encoder
            .adapters_mut()
            .into_iter()
            .map(|a| {
                let [a, b] = a.parameters();
                Ok((a.affine(1.0, 0.0)?.detach(), b.affine(1.0, 0.0)?.detach()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((head, adapters))
    };
    let mut best = snapshot(model)?;
    for epoch in 1..=lora.epochs {
        let start = Instant::now();
        let (mut loss_sum, mut right) = (0.0f64, 0usize);
        for batch in length_batches(&lengths, lora.batch_size, &mut rng) {
            // This rank's contiguous part of the minibatch (all of it in one process).
            let part = &batch[rank * batch.len() / ranks..(rank + 1) * batch.len() / ranks];
            let (mut grads, mut figures) = (lathe_core::GradStore::default(), [0.0f64; 2]);
            if !part.is_empty() {
                let rows: Vec<Vec<u32>> = part.iter().map(|&i| ids[i].clone()).collect();
                let targets: Vec<u32> = part.iter().map(|&i| labels[i]).collect();
                let logits = model.logits_ids(&rows)?;
                let target_t = Tensor::from_vec(targets.clone(), &[part.len()], &device)?;
                let loss = logits.cross_entropy(&target_t, None)?;
                // The part's mean weighed by its share: the parts' gradients sum to the
                // minibatch mean's.
                grads = if ranks == 1 {
                    loss.backward()?
                } else {
                    loss.affine(part.len() as f32 / batch.len() as f32, 0.0)?
                        .backward()?
                };
                figures = [
                    loss.to_scalar()? as f64 * part.len() as f64,
                    correct(&logits.detach(), &targets)? as f64,
                ];
            }
            let (grads, _) = all_reduce_grads(collective, grads, optimizer.params())?;
            optimizer.step(&grads)?;
            let [part_loss, part_right] = figures;
            let [batch_loss, batch_right] = if ranks == 1 {
                [part_loss, part_right]
            } else {
                let summed = sum_in_rank_order(collective, &figures)?;
                [summed[0], summed[1]]
            };
            check_finite(
                "LoRA",
                epoch,
                (batch_loss / batch.len() as f64) as f32,
                optimizer.params(),
            )?;
            loss_sum += batch_loss;
            right += batch_right as usize;
        }
        let eval = evaluate_ids(model, val_ids, val_labels, collective)?;
        let stats = EpochStats {
            stage: "lora",
            epoch,
            train_loss: (loss_sum / ids.len() as f64) as f32,
            train_accuracy: right as f32 / ids.len() as f32,
            val_loss: eval.loss,
            val_accuracy: eval.accuracy,
            seconds: start.elapsed().as_secs_f32(),
        };
        on_epoch(&stats);
        report.epochs.push(stats);
        let (is_best, halt) = stop.record(epoch, eval.loss);
        if is_best {
            best = snapshot(model)?;
        }
        if halt {
            report.stopped_early |= epoch < lora.epochs;
            break;
        }
    }
    // Keep the best epoch (0: the head stage's model, adapters still zero).
    let (head, adapters) = best;
    model.head = Some(head);
    for (adapter, (a, b)) in model.encoder.adapters_mut().into_iter().zip(adapters) {
        adapter.set_weights(a, b)?;
    }
    report.best_lora_epoch = Some(stop.best_epoch);
    Ok(())
}
