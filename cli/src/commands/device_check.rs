//! `lathe device-check`: a tiny causal attention block (embedding, LayerNorm, fused QKV with rotary,
//! masked softmax, GELU MLP, LM head) trained with AdamW on a synthetic next-token task where
//! token t is always followed by (3t + 1) mod V. The same seeds give the same run on every
//! device, so the CPU and GPU loss curves can be compared step by step.

use std::time::Instant;

use anyhow::Result;
use lathe_core::ops::rotary::RotaryTables;
use lathe_core::ops::softmax::AttentionMask;
use lathe_core::ops::unary::GeluKind;
use lathe_core::optim::{Adam, AdamConfig};
use lathe_core::{Device, MemCategory, Tensor};

/// Sizes and schedule of the device check.
#[derive(Clone, Debug)]
pub struct DeviceCheckConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub ffn: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub lr: f32,
    pub seed: u64,
}

impl Default for DeviceCheckConfig {
    fn default() -> Self {
        DeviceCheckConfig {
            vocab: 29,
            hidden: 32,
            heads: 4,
            ffn: 64,
            batch: 4,
            seq_len: 12,
            steps: 40,
            lr: 1e-2,
            seed: 0,
        }
    }
}

/// Targets of the last position are ignored (there is no next token).
const IGNORE: u32 = u32::MAX;

/// The block's weights, all trainable.
struct Block {
    embed: Tensor, // (V, H)
    ln1: (Tensor, Tensor),
    qkv: (Tensor, Tensor), // (3H, H), (3H)
    out: (Tensor, Tensor), // (H, H), (H)
    ln2: (Tensor, Tensor),
    fc1: (Tensor, Tensor), // (F, H), (F)
    fc2: (Tensor, Tensor), // (H, F), (H)
    ln_f: (Tensor, Tensor),
    head: Tensor, // (V, H)
}

impl Block {
    fn new(c: &DeviceCheckConfig, device: &Device) -> Result<Block> {
        let mut seed = c.seed * 1000;
        let mut param = |shape: &[usize], scale: f32| -> Result<Tensor> {
            seed += 1;
            let t = Tensor::rand_uniform(-scale, scale, shape, seed, &Device::Cpu)?;
            Ok(t.to_device_as(device, MemCategory::Weights)?
                .into_variable())
        };
        let ones = |n: usize| -> Result<Tensor> {
            Ok(Tensor::ones(&[n], &Device::Cpu)?
                .to_device_as(device, MemCategory::Weights)?
                .into_variable())
        };
        let (h, f, v) = (c.hidden, c.ffn, c.vocab);
        let (sh, sf) = (1.0 / (h as f32).sqrt(), 1.0 / (f as f32).sqrt());
        Ok(Block {
            embed: param(&[v, h], 1.0)?,
            ln1: (ones(h)?, param(&[h], 0.0)?),
            qkv: (param(&[3 * h, h], sh)?, param(&[3 * h], sh)?),
            out: (param(&[h, h], sh)?, param(&[h], sh)?),
            ln2: (ones(h)?, param(&[h], 0.0)?),
            fc1: (param(&[f, h], sh)?, param(&[f], sh)?),
            fc2: (param(&[h, f], sf)?, param(&[h], sf)?),
            ln_f: (ones(h)?, param(&[h], 0.0)?),
            head: param(&[v, h], sh)?,
        })
    }

    fn params(&self) -> Vec<Tensor> {
        let mut p = vec![self.embed.clone(), self.head.clone()];
        for (w, b) in [
            &self.ln1, &self.qkv, &self.out, &self.ln2, &self.fc1, &self.fc2, &self.ln_f,
        ] {
            p.push(w.clone());
            p.push(b.clone());
        }
        p
    }

    /// Logits (B, T, V) for ids (B, T).
    fn forward(
        &self,
        c: &DeviceCheckConfig,
        ids: &Tensor,
        positions: &Tensor,
        rotary: &RotaryTables,
    ) -> Result<Tensor> {
        let (b, t, h, nh) = (c.batch, c.seq_len, c.hidden, c.heads);
        let hd = h / nh;
        let linear = |x: &Tensor, (w, bias): &(Tensor, Tensor)| -> Result<Tensor> {
            Ok(x.matmul_t(w, false, true)?.bias_add(bias)?)
        };
        let x = Tensor::embedding(&self.embed, ids)?; // (B, T, H)
        let normed = x.layer_norm(Some(&self.ln1.0), Some(&self.ln1.1), 1e-5)?;
        let qkv = linear(&normed, &self.qkv)?; // (B, T, 3H)
        let heads = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, i * h, h)?
                .reshape(&[b, t, nh, hd])?
                .permute(&[0, 2, 1, 3])?) // (B, nh, T, hd)
        };
        let q = heads(0)?.rotary(rotary, positions)?;
        let k = heads(1)?.rotary(rotary, positions)?;
        let v = heads(2)?;
        let scores = q
            .matmul_t(&k, false, true)?
            .scale(1.0 / (hd as f32).sqrt())?; // (B, nh, T, T)
        let probs = scores.masked_softmax(&AttentionMask {
            causal: true,
            key_ranges: None,
        })?;
        let attn = probs
            .matmul(&v)?
            .permute(&[0, 2, 1, 3])?
            .reshape(&[b, t, h])?;
        let x = x.add(&linear(&attn, &self.out)?)?;
        let normed = x.layer_norm(Some(&self.ln2.0), Some(&self.ln2.1), 1e-5)?;
        let mlp = linear(
            &linear(&normed, &self.fc1)?.gelu(GeluKind::Tanh)?,
            &self.fc2,
        )?;
        let x = x.add(&mlp)?;
        let normed = x.layer_norm(Some(&self.ln_f.0), Some(&self.ln_f.1), 1e-5)?;
        Ok(normed.matmul_t(&self.head, false, true)?)
    }
}

/// The synthetic batch: ids (B, T), next-token targets (B*T) with the last position ignored.
fn batch(c: &DeviceCheckConfig) -> (Vec<u32>, Vec<u32>) {
    let v = c.vocab as u32;
    let mut ids = Vec::with_capacity(c.batch * c.seq_len);
    let mut targets = Vec::with_capacity(c.batch * c.seq_len);
    for row in 0..c.batch {
        let mut token = (row as u32 * 7 + c.seed as u32) % v;
        for pos in 0..c.seq_len {
            ids.push(token);
            let next = (3 * token + 1) % v;
            targets.push(if pos + 1 == c.seq_len { IGNORE } else { next });
            token = next;
        }
    }
    (ids, targets)
}

/// Trains on `device` and returns the loss before each step.
pub fn train(c: &DeviceCheckConfig, device: &Device) -> Result<Vec<f32>> {
    let block = Block::new(c, device)?;
    let (ids, targets) = batch(c);
    let ids = Tensor::from_vec(ids, &[c.batch, c.seq_len], device)?;
    let targets = Tensor::from_vec(targets, &[c.batch * c.seq_len], device)?;
    let positions: Vec<u32> = (0..c.batch).flat_map(|_| 0..c.seq_len as u32).collect();
    let positions = Tensor::from_vec(positions, &[c.batch, c.seq_len], device)?;
    let rotary = RotaryTables::new(c.seq_len, c.hidden / c.heads / 2, 10_000.0, device)?;
    let mut optimizer = Adam::new(
        block.params(),
        AdamConfig {
            lr: c.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            decoupled: true,
        },
    )?;
    let mut losses = Vec::with_capacity(c.steps);
    for _ in 0..c.steps {
        let logits = block.forward(c, &ids, &positions, &rotary)?;
        let loss = logits
            .reshape(&[c.batch * c.seq_len, c.vocab])?
            .cross_entropy(&targets, Some(IGNORE))?;
        losses.push(loss.to_scalar()?);
        let grads = loss.backward()?;
        optimizer.step(&grads)?;
    }
    Ok(losses)
}

/// Runs the check on each device and prints the loss curves side by side.
pub fn run_and_print(c: &DeviceCheckConfig, devices: &[Device]) -> Result<()> {
    println!(
        "lathe device-check: causal attention block (V {}, H {}, {} heads, FFN {}), batch {} x {} tokens, {} AdamW steps",
        c.vocab, c.hidden, c.heads, c.ffn, c.batch, c.seq_len, c.steps
    );
    let mut curves = Vec::new();
    for device in devices {
        if let Some(ctx) = device.gpu_context() {
            println!("gpu adapter: {}", ctx.report());
        }
        let start = Instant::now();
        let losses = train(c, device)?;
        println!(
            "{:>5}: {} steps in {:.2} s",
            device_label(device),
            c.steps,
            start.elapsed().as_secs_f64()
        );
        curves.push(losses);
    }
    print!("{:>5}", "step");
    for device in devices {
        print!(" {:>12}", device_label(device));
    }
    println!();
    for step in 0..c.steps {
        if step % 5 == 0 || step + 1 == c.steps {
            print!("{step:>5}");
            for curve in &curves {
                print!(" {:>12.6}", curve[step]);
            }
            println!();
        }
    }
    if curves.len() == 2 {
        let worst = curves[0]
            .iter()
            .zip(&curves[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!("largest CPU/GPU loss difference over all steps: {worst:.2e}");
    }
    for device in devices {
        if let Some(ctx) = device.gpu_context() {
            println!("GPU memory ledger:\n{}", ctx.ledger_snapshot());
        }
    }
    Ok(())
}

fn device_label(device: &Device) -> &'static str {
    if device.is_gpu() {
        "gpu"
    } else {
        "cpu"
    }
}
