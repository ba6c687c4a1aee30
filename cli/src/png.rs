//! Line plots as PNG files: an RGB canvas, axes and grid, each series a 2-pixel polyline,
//! encoded as a standard PNG (zlib through flate2, CRC-32 per chunk). The values and labels
//! are in the HTML report's SVG; the PNGs are for tools and pages that take images.

use std::io::Write;

const BACKGROUND: [u8; 3] = [255, 255, 255];
const AXIS: [u8; 3] = [60, 60, 60];
const GRID: [u8; 3] = [221, 221, 221];
const COLORS: [[u8; 3]; 3] = [[31, 119, 180], [214, 39, 40], [44, 160, 44]];

struct Canvas {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Canvas {
        Canvas {
            width,
            height,
            rgb: BACKGROUND.repeat(width * height),
        }
    }

    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.rgb[i..i + 3].copy_from_slice(&color);
        }
    }

    /// Bresenham's line, `thick` pixels wide.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: [u8; 3], thick: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for ox in 0..thick {
                for oy in 0..thick {
                    self.set(x + ox, y + oy, color);
                }
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }
}

/// (x0, x1, y0, y1): the range of every point of every series, widened where it is empty
/// (one x, or flat y) so a plot can divide by it. The SVG and the PNG plots share it.
pub(crate) fn plot_bounds(series: &[Vec<(f64, f64)>]) -> (f64, f64, f64, f64) {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in series.iter().flatten() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-9 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    (x0, x1, y0, y1)
}

/// The plot of every series (x, y) on shared axes, as PNG bytes.
pub fn plot_png(series: &[Vec<(f64, f64)>], width: usize, height: usize) -> Vec<u8> {
    let mut canvas = Canvas::new(width, height);
    let (left, right, top, bottom) = (40i64, 12i64, 12i64, 28i64);
    let (w, h) = (width as i64, height as i64);
    let (x0, x1, y0, y1) = plot_bounds(series);
    let px = |x: f64| left + ((x - x0) / (x1 - x0) * (w - left - right) as f64).round() as i64;
    let py = |y: f64| top + ((y1 - y) / (y1 - y0) * (h - top - bottom) as f64).round() as i64;
    for i in 0..=4 {
        let y = top + (h - top - bottom) * i / 4;
        canvas.line((left, y), (w - right, y), GRID, 1);
    }
    canvas.line((left, top), (left, h - bottom), AXIS, 1);
    canvas.line((left, h - bottom), (w - right, h - bottom), AXIS, 1);
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        for pair in s.windows(2) {
            canvas.line(
                (px(pair[0].0), py(pair[0].1)),
                (px(pair[1].0), py(pair[1].1)),
                color,
                2,
            );
        }
        if let [only] = s.as_slice() {
            canvas.line((px(only.0), py(only.1)), (px(only.0), py(only.1)), color, 3);
        }
    }
    encode_png(&canvas)
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend(crc32(&body).to_be_bytes());
}

fn encode_png(canvas: &Canvas) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut header = Vec::with_capacity(13);
    header.extend((canvas.width as u32).to_be_bytes());
    header.extend((canvas.height as u32).to_be_bytes());
    header.extend([8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter method, no interlace
    chunk(&mut out, b"IHDR", &header);
    let mut raw = Vec::with_capacity((canvas.width * 3 + 1) * canvas.height);
    for row in canvas.rgb.chunks(canvas.width * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&raw).expect("writing to memory");
    chunk(
        &mut out,
        b"IDAT",
        &encoder.finish().expect("writing to memory"),
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRC of "IEND" with no data is the constant every PNG ends with.
    #[test]
    fn crc_and_structure() {
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
        let png = plot_png(&[vec![(1.0, 0.0), (2.0, 1.0), (3.0, 0.5)]], 64, 32);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
        // The IDAT payload inflates to height rows of 1 + 3 * width bytes.
        let idat_len = u32::from_be_bytes(png[33..37].try_into().unwrap()) as usize;
        assert_eq!(&png[37..41], b"IDAT");
        let mut inflated = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::ZlibDecoder::new(&png[41..41 + idat_len]),
            &mut inflated,
        )
        .unwrap();
        assert_eq!(inflated.len(), 32 * (1 + 3 * 64));
        // The curve drew something that is neither background nor grey.
        assert!(inflated.chunks(3).any(|p| p == [31, 119, 180]));
    }
}
