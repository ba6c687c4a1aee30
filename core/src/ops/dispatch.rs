//! Launching kernels over buffers that may exceed one storage binding.
//!
//! wgpu binds at most `max_storage_buffer_binding_size` bytes per buffer (2 GiB on NVIDIA, 128
//! MiB by default), while one buffer may be larger (a vocabulary's logits, a big embedding, a
//! long KV cache). Kernels index from the start of whatever window they are given, so an op
//! over such a tensor dispatches once per window of rows that fits; when everything fits, it
//! is one dispatch over whole buffers, exactly as if nothing were split.
//!
//! A window must start at a multiple of the adapter's offset alignment (16 to 256 bytes), so a
//! chunk of rows starts where every split buffer's window is aligned: a step of at most
//! `alignment / 4` rows. An op fails with `BindingTooLarge` only when that many rows of one
//! buffer exceed the binding limit — rows of megabytes on a real adapter.

use lathe_shaders::{GpuBuffer, GpuContext, Launch, Shader, View};

use crate::Result;

/// How one buffer of a row-split dispatch is bound.
#[derive(Clone, Copy)]
pub enum Arg<'a> {
    /// Row r of the dispatch owns bytes `[r * bytes, (r + 1) * bytes)`: each chunk binds the
    /// window of its rows.
    Rows(&'a GpuBuffer, usize),
    /// Read whole by every chunk (a weight, a table, per-column parameters).
    Whole(&'a GpuBuffer),
}

impl<'a> Arg<'a> {
    fn whole_view(&self) -> View<'a> {
        match *self {
            Arg::Rows(b, _) | Arg::Whole(b) => View::whole(b),
        }
    }
}

pub(crate) fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The most rows (at most `rows`) whose windows fit the binding limit in buffers of
/// `row_bytes` bytes per row, chunks starting at rows where every window is aligned. `None`
/// when not even one aligned step of rows fits.
pub fn rows_fitting(ctx: &GpuContext, row_bytes: &[usize], rows: usize) -> Option<usize> {
    let limit = ctx.binding_limit() as usize;
    let align = ctx.binding_alignment().max(4) as usize;
    let mut step = 1usize;
    let mut most = rows.max(1);
    for &bytes in row_bytes.iter().filter(|&&b| b > 0) {
        let unit = align / gcd(bytes, align);
        step = step / gcd(step, unit) * unit;
        most = most.min(limit / bytes);
    }
    if rows <= most {
        return Some(rows.max(1));
    }
    match most / step * step {
        0 => None,
        chunk => Some(chunk),
    }
}

/// [`rows_fitting`], or the binding error naming the kernel when not one row fits.
pub fn rows_fitting_or_err(
    ctx: &GpuContext,
    shader: Shader,
    entry: &'static str,
    row_bytes: &[usize],
    rows: usize,
) -> Result<usize> {
    rows_fitting(ctx, row_bytes, rows).ok_or_else(|| {
        lathe_shaders::Error::BindingTooLarge {
            shader,
            entry,
            binding: 0,
            size: row_bytes.iter().copied().max().unwrap_or(0) as u64,
            max: ctx.binding_limit(),
        }
        .into()
    })
}

/// Rows per dispatch so that every `Rows` window fits the binding limit and starts aligned;
/// `None` when every buffer fits whole (one dispatch, as if nothing were split).
fn rows_per_chunk(
    ctx: &GpuContext,
    shader: Shader,
    entry: &'static str,
    args: &[Arg],
    rows: usize,
) -> Result<Option<usize>> {
    let limit = ctx.binding_limit();
    if args.iter().all(|a| a.whole_view().size <= limit) {
        return Ok(None);
    }
    let too_large = |binding: usize, size: u64| lathe_shaders::Error::BindingTooLarge {
        shader,
        entry,
        binding,
        size,
        max: limit,
    };
    for (binding, arg) in args.iter().enumerate() {
        if matches!(arg, Arg::Whole(_)) && arg.whole_view().size > limit {
            return Err(too_large(binding, arg.whole_view().size).into());
        }
    }
    let row_bytes: Vec<usize> = args
        .iter()
        .map(|a| match a {
            Arg::Rows(_, bytes) => *bytes,
            Arg::Whole(_) => 0,
        })
        .collect();
    match rows_fitting(ctx, &row_bytes, rows) {
        Some(chunk) => Ok(Some(chunk)),
        None => {
            let (binding, bytes) = row_bytes
                .iter()
                .enumerate()
                .max_by_key(|(_, b)| **b)
                .map_or((0, 0), |(i, b)| (i, *b as u64));
            Err(too_large(binding, bytes).into())
        }
    }
}

/// Launches a kernel over `rows` independent rows: one dispatch when every buffer fits the
/// binding limit, else one per chunk of rows, each binding the window of its rows.
/// `dispatch(first_row, rows)` gives the parameters and grid of a dispatch over `rows` rows
/// starting at `first_row` (most kernels need only the count; the first row matters to
/// those whose math depends on a row's global index).
pub fn launch_rows<P: bytemuck::Pod>(
    ctx: &GpuContext,
    shader: Shader,
    entry: &'static str,
    inputs: &[Arg],
    outputs: &[Arg],
    rows: usize,
    dispatch: impl Fn(usize, usize) -> (P, [u32; 3]),
) -> Result<()> {
    let args: Vec<Arg> = inputs.iter().chain(outputs).copied().collect();
    let Some(chunk) = rows_per_chunk(ctx, shader, entry, &args, rows)? else {
        let (params, grid) = dispatch(0, rows);
        let views: Vec<View> = args.iter().map(Arg::whole_view).collect();
        return launch_views(ctx, shader, entry, &views, inputs.len(), &params, grid);
    };
    for first in (0..rows).step_by(chunk) {
        let count = chunk.min(rows - first);
        let views: Vec<View> = args
            .iter()
            .map(|a| match *a {
                Arg::Rows(b, bytes) => {
                    View::window(b, (first * bytes) as u64, (count * bytes) as u64)
                }
                Arg::Whole(b) => View::whole(b),
            })
            .collect();
        let (params, grid) = dispatch(first, count);
        launch_views(ctx, shader, entry, &views, inputs.len(), &params, grid)?;
    }
    Ok(())
}

/// Launches one kernel over explicit views, the first `inputs` of them read-only.
pub fn launch_views<P: bytemuck::Pod>(
    ctx: &GpuContext,
    shader: Shader,
    entry: &'static str,
    views: &[View],
    inputs: usize,
    params: &P,
    workgroups: [u32; 3],
) -> Result<()> {
    ctx.launch(&Launch {
        shader,
        entry,
        inputs: &views[..inputs],
        outputs: &views[inputs..],
        params: bytemuck::bytes_of(params),
        workgroups,
    })?;
    Ok(())
}

/// A piece of a strided op: its shape and each operand's first element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tile {
    /// The piece's shape (the op's rank).
    pub shape: Vec<usize>,
    /// Per operand, the element offset of the piece's first element.
    pub starts: Vec<usize>,
}

/// Elements from the first to one past the last that a strided walk over `shape` touches.
pub fn span(shape: &[usize], strides: &[usize]) -> usize {
    1 + shape
        .iter()
        .zip(strides)
        .map(|(n, s)| n.saturating_sub(1) * s)
        .sum::<usize>()
}

/// Splits an op over `shape`, whose operand k reads element `starts[k] + Σ idx_d *
/// strides[k][d]`, into tiles in which every operand spans at most `budgets[k]` elements:
/// the dimension reaching farthest in any operand is cut into pieces, recursively. Any
/// strides work (a transpose becomes tiles); a tile of one element spans one element.
pub fn strided_tiles(
    shape: &[usize],
    strides: &[Vec<usize>],
    starts: Vec<usize>,
    budgets: &[usize],
) -> Vec<Tile> {
    let mut tiles = Vec::new();
    split_tile(
        Tile {
            shape: shape.to_vec(),
            starts,
        },
        strides,
        budgets,
        &mut tiles,
    );
    tiles
}

fn split_tile(tile: Tile, strides: &[Vec<usize>], budgets: &[usize], tiles: &mut Vec<Tile>) {
    if tile.shape.contains(&0) {
        return;
    }
    let over = strides
        .iter()
        .zip(budgets)
        .map(|(s, &b)| span(&tile.shape, s).div_ceil(b.max(1)))
        .max()
        .unwrap_or(1);
    if over <= 1 {
        tiles.push(tile);
        return;
    }
    let reach = |d: usize| {
        strides
            .iter()
            .zip(budgets)
            .map(|(s, &b)| (tile.shape[d] - 1) * s[d] / b.max(1))
            .max()
            .unwrap_or(0)
    };
    let widest = (0..tile.shape.len())
        .filter(|&d| tile.shape[d] > 1)
        .max_by_key(|&d| reach(d))
        .expect("a walk spanning more than one element has a dimension to cut");
    let size = tile.shape[widest];
    let piece = size.div_ceil(over.clamp(2, size));
    for first in (0..size).step_by(piece) {
        let mut sub = tile.clone();
        sub.shape[widest] = piece.min(size - first);
        for (start, s) in sub.starts.iter_mut().zip(strides) {
            *start += first * s[widest];
        }
        split_tile(sub, strides, budgets, tiles);
    }
}

/// Elements a window may span so that, started at an aligned byte at most one alignment
/// unit before the first element, it fits the binding limit.
pub fn window_budget(ctx: &GpuContext, elem_bytes: usize) -> usize {
    let align = ctx.binding_alignment().max(4) as usize;
    (ctx.binding_limit() as usize).saturating_sub(align) / elem_bytes
}

/// The window over `span` elements of `elem_bytes` bytes from element `start`, its start
/// aligned down, and the offset of `start` inside it (in elements).
pub fn window_at<'a>(
    ctx: &GpuContext,
    buffer: &'a GpuBuffer,
    start: usize,
    span: usize,
    elem_bytes: usize,
) -> (View<'a>, usize) {
    let align = ctx.binding_alignment().max(4) as usize;
    let first = start * elem_bytes;
    let aligned = first / align * align;
    let view = View::window(
        buffer,
        aligned as u64,
        (first + span * elem_bytes - aligned) as u64,
    );
    (view, (first - aligned) / elem_bytes)
}
