//! The processes of a data-parallel job and what they exchange.
//!
//! lathe trains small things (LoRA, a value head, a reward head): a step's gradients and
//! statistics are a few MB, reduced on the host. A [`Collective`] is the engine that
//! carries them between processes: [`Solo`] (one process, the default) here, MPI in
//! `lathe_train::mpi` behind the `mpi` feature.
//!
//! Every reduction is a gather followed by a sum in rank order ([`sum_in_rank_order`]), never
//! the engine's own reduce, whose order is the engine's business: so every rank gets the same
//! bits, and N ranks that each hold one micro-batch add them exactly as one process
//! accumulating the same N micro-batches does (`GradStore::accumulate`).

use crate::{Error, GradStore, Result, Tensor};

/// The processes of one job: who this one is, and the collective operations they all call
/// in the same order. A failed operation is [`Error::Collective`]; the caller then ends the
/// job ([`Collective::abort`]) rather than leave the other ranks waiting.
pub trait Collective: Send + Sync {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn size(&self) -> usize;
    /// Every rank's `local` (the same length on each rank), concatenated in rank order.
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>>;
    /// Every rank's `local` (the same length on each rank), concatenated in rank order.
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>>;
    /// Every rank's bytes (any length), in rank order.
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Ends every process of the job with `code`, after printing `message` (MPI_Abort).
    fn abort(&self, message: &str, code: i32) -> !;

    /// Whether this process is rank 0, the one that writes the job's files.
    fn is_writer(&self) -> bool {
        self.rank() == 0
    }
    /// Whether `flag` is set on any rank (a Ctrl-C seen by one process stops them all at
    /// the same step).
    fn any(&self, flag: bool) -> Result<bool> {
        Ok(self
            .all_gather_f64(&[f64::from(u8::from(flag))])?
            .iter()
            .any(|&v| v != 0.0))
    }
}

/// One process: rank 0 of 1; every gather returns its input.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
        Ok(local.to_vec())
    }
    fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(local.to_vec())
    }
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![local.to_vec()])
    }
    fn abort(&self, message: &str, code: i32) -> ! {
        eprintln!("{message}");
        std::process::exit(code)
    }
}

/// The element-wise sum over ranks of `local` (the same length on every rank), added in rank
/// order: `((r0 + r1) + r2) + ...`, the same bits on every rank.
pub fn sum_in_rank_order(collective: &dyn Collective, local: &[f64]) -> Result<Vec<f64>> {
    let all = collective.all_gather_f64(local)?;
    Ok(fold_ranks(&all, local.len(), |a, b| a + b))
}

/// The gradients of `params` summed over ranks, in rank order, as `GradStore::accumulate`
/// adds micro-batches; a parameter no rank reached stays without a gradient, and one some
/// ranks did not reach counts as zeros there. Returns the store and the f32 values each rank
/// sent (the bytes a step exchanges are 4 x that x (ranks - 1) per rank).
pub fn all_reduce_grads(
    collective: &dyn Collective,
    grads: GradStore,
    params: &[Tensor],
) -> Result<(GradStore, usize)> {
    if collective.size() == 1 {
        return Ok((grads, 0));
    }
    // Which parameters have a gradient anywhere: a flag per parameter, gathered first, so
    // that every rank sends the same layout.
    let reached: Vec<f64> = params
        .iter()
        .map(|p| f64::from(u8::from(grads.get(p).is_some())))
        .collect();
    let reached_anywhere = fold_ranks(
        &collective.all_gather_f64(&reached)?,
        params.len(),
        f64::max,
    );
    let mut flat = Vec::new();
    for (p, &any) in params.iter().zip(&reached_anywhere) {
        if any == 0.0 {
            continue;
        }
        match grads.get(p) {
            Some(g) => flat.extend(g.to_vec_f32()?),
            None => flat.resize(flat.len() + p.elem_count(), 0.0),
        }
    }
    let all = collective.all_gather_f32(&flat)?;
    if all.len() != flat.len() * collective.size() {
        return Err(Error::Collective(format!(
            "gradients: gathered {} values from {} ranks of {} each",
            all.len(),
            collective.size(),
            flat.len()
        )));
    }
    let summed = fold_ranks(&all, flat.len(), |a, b| a + b);
    let mut out = GradStore::default();
    let mut at = 0;
    for (p, &any) in params.iter().zip(&reached_anywhere) {
        if any == 0.0 {
            continue;
        }
        let n = p.elem_count();
        let g = Tensor::from_vec(summed[at..at + n].to_vec(), p.shape(), p.device())?;
        out.insert(p, g);
        at += n;
    }
    Ok((out, flat.len()))
}

/// Refuses to start a job whose ranks were given different inputs: each of `parts` (a name
/// and what this rank holds, such as the settings as JSON, the model's and the data's
/// fingerprints) must equal rank 0's. The error names the part, the first rank that
/// differs, and for JSON objects the keys whose values differ.
pub fn check_same_inputs(collective: &dyn Collective, parts: &[(&str, String)]) -> Result<()> {
    if collective.size() == 1 {
        return Ok(());
    }
    for (name, mine) in parts {
        let all = collective.all_gather_bytes(mine.as_bytes())?;
        let Some((rank, theirs)) = all.iter().enumerate().find(|(_, b)| *b != &all[0]) else {
            continue;
        };
        let (first, other) = (
            String::from_utf8_lossy(&all[0]),
            String::from_utf8_lossy(theirs),
        );
        return Err(Error::Collective(format!(
            "the {name} of rank {rank} and rank 0 differ: {}; every rank must \
             run the same command on the same files",
            describe_difference(&first, &other)
        )));
    }
    Ok(())
}

/// The keys of two JSON objects whose values differ (`key: a vs b`), or both texts
/// shortened.
fn describe_difference(a: &str, b: &str) -> String {
    use serde_json::Value;
    let short = |s: &str| -> String {
        let cut: String = s.chars().take(120).collect();
        if cut.len() < s.len() {
            format!("{cut}...")
        } else {
            cut
        }
    };
    match (
        serde_json::from_str::<Value>(a),
        serde_json::from_str::<Value>(b),
    ) {
        (Ok(Value::Object(x)), Ok(Value::Object(y))) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            let diffs: Vec<String> = keys
                .into_iter()
                .filter(|k| x.get(*k) != y.get(*k))
                .map(|k| {
                    let show =
                        |v: Option<&Value>| v.map_or("(absent)".into(), |v| short(&v.to_string()));
                    format!("{k} {} (rank 0) vs {}", show(x.get(k)), show(y.get(k)))
                })
                .collect();
            diffs.join(", ")
        }
        _ => format!("{} (rank 0) vs {}", short(a), short(b)),
    }
}

/// `all` as `size` rank-ordered runs of `len` values, folded with `add` in rank order.
fn fold_ranks<T: Copy>(all: &[T], len: usize, add: impl Fn(T, T) -> T) -> Vec<T> {
    let mut runs = all.chunks_exact(len.max(1));
    let Some(first) = runs.next() else {
        return Vec::new();
    };
    let mut total = first.to_vec();
    for run in runs {
        for (t, &v) in total.iter_mut().zip(run) {
            *t = add(*t, v);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    /// Two ranks played by one process: the gathers return what the "other rank" holds.
    struct Pair {
        other_f32: Vec<f32>,
        other_f64: Vec<f64>,
    }

    impl Collective for Pair {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            2
        }
        fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
            let other = if self.other_f64.len() == local.len() {
                self.other_f64.clone()
            } else {
                vec![1.0; local.len()]
            };
            Ok([local.to_vec(), other].concat())
        }
        fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>> {
            Ok([local.to_vec(), self.other_f32.clone()].concat())
        }
        fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
            Ok(vec![local.to_vec(), local.to_vec()])
        }
        fn abort(&self, message: &str, _code: i32) -> ! {
            panic!("{message}")
        }
    }

    #[test]
    fn reduced_gradients_are_the_accumulated_ones_bit_for_bit() {
        let dev = Device::Cpu;
        let p = Tensor::from_vec(vec![0.0f32; 3], &[3], &dev)
            .unwrap()
            .into_variable();
        let (mine, theirs) = (vec![0.1f32, 1e-8, -3.0], vec![0.2f32, 1.0, 3.0]);
        let grads_of = |v: &Vec<f32>| {
            let mut g = GradStore::default();
            g.insert(&p, Tensor::from_vec(v.clone(), &[3], &dev).unwrap());
            g
        };
        let accumulated = GradStore::accumulate(
            Some(grads_of(&mine)),
            grads_of(&theirs),
            std::slice::from_ref(&p),
        )
        .unwrap();
        let pair = Pair {
            other_f32: theirs.clone(),
            other_f64: Vec::new(),
        };
        let (reduced, sent) =
            all_reduce_grads(&pair, grads_of(&mine), std::slice::from_ref(&p)).unwrap();
        assert_eq!(sent, 3);
        let a = accumulated.get(&p).unwrap().to_vec_f32().unwrap();
        let b = reduced.get(&p).unwrap().to_vec_f32().unwrap();
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_parameter_only_the_other_rank_reached_gets_its_gradient() {
        let dev = Device::Cpu;
        let p = Tensor::from_vec(vec![0.0f32; 2], &[2], &dev)
            .unwrap()
            .into_variable();
        let pair = Pair {
            other_f32: vec![4.0, 5.0],
            other_f64: vec![1.0],
        };
        let (reduced, _) =
            all_reduce_grads(&pair, GradStore::default(), std::slice::from_ref(&p)).unwrap();
        assert_eq!(
            reduced.get(&p).unwrap().to_vec_f32().unwrap(),
            vec![4.0, 5.0]
        );
    }

    /// Two ranks whose second was given `theirs` in every byte gather.
    struct Differing {
        theirs: Vec<u8>,
    }

    impl Collective for Differing {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            2
        }
        fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
            Ok([local, local].concat())
        }
        fn all_gather_f32(&self, local: &[f32]) -> Result<Vec<f32>> {
            Ok([local, local].concat())
        }
        fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
            Ok(vec![local.to_vec(), self.theirs.clone()])
        }
        fn abort(&self, message: &str, _code: i32) -> ! {
            panic!("{message}")
        }
    }

    #[test]
    fn a_rank_with_other_settings_is_named_with_the_keys_that_differ() {
        let ours = r#"{"lr":0.001,"seed":1,"batch_size":4}"#.to_string();
        let same = Differing {
            theirs: ours.clone().into_bytes(),
        };
        check_same_inputs(&same, &[("settings", ours.clone())]).unwrap();
        let other = Differing {
            theirs: br#"{"lr":0.002,"seed":1,"batch_size":4}"#.to_vec(),
        };
        let err = check_same_inputs(&other, &[("settings", ours)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rank 1")
                && err.contains("settings")
                && err.contains("lr 0.001 (rank 0) vs 0.002"),
            "{err}"
        );
        assert!(!err.contains("seed"), "{err}");
        let data = Differing {
            theirs: b"sha256:bbbb".to_vec(),
        };
        let err = check_same_inputs(&data, &[("data", "sha256:aaaa".into())])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("data") && err.contains("sha256:aaaa (rank 0) vs sha256:bbbb"),
            "{err}"
        );
    }

    #[test]
    fn sums_and_flags_fold_in_rank_order() {
        let pair = Pair {
            other_f32: Vec::new(),
            other_f64: vec![2.5, 0.0],
        };
        assert_eq!(
            sum_in_rank_order(&pair, &[1.0, 3.0]).unwrap(),
            vec![3.5, 3.0]
        );
        let quiet = Pair {
            other_f32: Vec::new(),
            other_f64: vec![0.0],
        };
        assert!(!quiet.any(false).unwrap());
        assert!(quiet.any(true).unwrap());
        assert!(Solo.any(true).unwrap() && !Solo.any(false).unwrap());
    }
}
