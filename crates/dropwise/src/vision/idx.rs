//! IDX files (the MNIST format, LeCun et al.): a big-endian header — two zero bytes, a type
//! byte (0x08: unsigned bytes), a rank byte, then one u32 per dimension — and the values. An
//! image set is an images file (rank 3: count × rows × cols) and a labels file (rank 1) of the
//! same count, as Fashion-MNIST ships them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Images of one size with their class labels.
#[derive(Clone, Debug)]
pub struct ImageSet {
    pub rows: usize,
    pub cols: usize,
    /// `count × rows × cols` grey levels, 0..=255, image after image.
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Most classes a label file may name (a label is one byte).
    pub fn classes(&self) -> usize {
        self.labels.iter().copied().max().map_or(0, |m| m as usize + 1)
    }

    /// The images whose label satisfies `keep`, in order.
    pub fn filter(&self, keep: impl Fn(u8) -> bool) -> ImageSet {
        let n = self.rows * self.cols;
        let mut out = ImageSet { rows: self.rows, cols: self.cols, pixels: Vec::new(), labels: Vec::new() };
        for (i, &l) in self.labels.iter().enumerate() {
            if keep(l) {
                out.pixels.extend_from_slice(&self.pixels[i * n..(i + 1) * n]);
                out.labels.push(l);
            }
        }
        out
    }

    /// The images at `picks`, in that order.
    pub fn pick(&self, picks: &[usize]) -> ImageSet {
        ImageSet { rows: self.rows, cols: self.cols, pixels: picks.iter().flat_map(|&i| self.image(i).iter().copied()).collect(), labels: picks.iter().map(|&i| self.labels[i]).collect() }
    }

    /// A seeded sample of `n` images (calibration draws from the training images this way).
    pub fn sample(&self, n: usize, seed: u64) -> ImageSet {
        let mut rng = crate::data::SplitMix64(seed);
        let picks: Vec<usize> = crate::vision::train::permutation(self.len(), &mut rng).into_iter().take(n).collect();
        self.pick(&picks)
    }

    /// The first `n` images (all when fewer).
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.labels.truncate(n);
            self.pixels.truncate(n * self.rows * self.cols);
        }
    }
}

/// Largest side an image may have (a corrupt header must not become a huge allocation).
const MAX_SIDE: u32 = 4096;

/// Parses an IDX file of unsigned bytes with `rank` dimensions: the dimensions and the values.
pub fn parse<'a>(bytes: &'a [u8], rank: usize, what: &str) -> Result<(Vec<usize>, &'a [u8])> {
    if bytes.len() < 4 {
        bail!("{what}: {} bytes is too short for an IDX header", bytes.len());
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        bail!("{what}: not an IDX file (magic {:02x}{:02x}{:02x}{:02x}; expected 0000 08 0{rank})", bytes[0], bytes[1], bytes[2], bytes[3]);
    }
    if bytes[2] != 0x08 {
        bail!("{what}: IDX value type 0x{:02x}; only unsigned bytes (0x08) are read", bytes[2]);
    }
    if bytes[3] as usize != rank {
        bail!("{what}: an IDX file of rank {}, expected {rank}", bytes[3]);
    }
    let head = 4 + 4 * rank;
    if bytes.len() < head {
        bail!("{what}: truncated IDX header ({} bytes, {head} needed)", bytes.len());
    }
    let dims: Vec<usize> = (0..rank).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    // u64 product: the dimensions are u32 each, so this cannot overflow for rank ≤ 3.
    let want: u64 = dims.iter().map(|&d| d as u64).product();
    let have = (bytes.len() - head) as u64;
    if have < want {
        bail!("{what}: truncated: the header promises {want} values ({dims:?}), the file holds {have}");
    }
    if have > want {
        bail!("{what}: {} bytes after the {want} values the header promises ({dims:?})", have - want);
    }
    Ok((dims, &bytes[head..]))
}

/// Reads an images file (`count × rows × cols`) and its labels file.
pub fn read_pair(images: &Path, labels: &Path) -> Result<ImageSet> {
    let ib = std::fs::read(images).with_context(|| format!("cannot read {}", images.display()))?;
    let lb = std::fs::read(labels).with_context(|| format!("cannot read {}", labels.display()))?;
    let (dims, px) = parse(&ib, 3, &images.display().to_string())?;
    let (ldims, lv) = parse(&lb, 1, &labels.display().to_string())?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 || rows > MAX_SIDE as usize || cols > MAX_SIDE as usize {
        bail!("{}: images of {rows}×{cols} pixels (each side 1..={MAX_SIDE})", images.display());
    }
    if n == 0 {
        bail!("{}: holds no image", images.display());
    }
    if ldims[0] != n {
        bail!("{} holds {n} images but {} holds {} labels", images.display(), labels.display(), ldims[0]);
    }
    Ok(ImageSet { rows, cols, pixels: px.to_vec(), labels: lv.to_vec() })
}

/// Which half of a dataset folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// The images and labels of `split` in an MNIST-style folder (`train-images-idx3-ubyte` and
/// `train-labels-idx1-ubyte`, or `t10k-…`).
pub fn read_split(dir: &Path, split: Split) -> Result<ImageSet> {
    if !dir.is_dir() {
        bail!("{}: not a folder (an image set is a folder of IDX files, as Fashion-MNIST ships them)", dir.display());
    }
    let stem = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let file = |kind: &str| -> Result<PathBuf> {
        let p = dir.join(format!("{stem}-{kind}"));
        if p.exists() {
            return Ok(p);
        }
        if dir.join(format!("{stem}-{kind}.gz")).exists() {
            bail!("{}: {stem}-{kind} is still gzipped; gunzip it (or fetch with scripts/fetch_assets.py --fashion-mnist)", dir.display());
        }
        bail!("{}: no {stem}-{kind} file", dir.display());
    };
    read_pair(&file("images-idx3-ubyte")?, &file("labels-idx1-ubyte")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(rank: u8, dims: &[u32]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, rank];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn parses_and_refuses() {
        let mut ok = header(3, &[2, 2, 3]);
        ok.extend(0..12u8);
        let (dims, v) = parse(&ok, 3, "x").unwrap();
        assert_eq!((dims, v.len()), (vec![2, 2, 3], 12));
        let err = |b: &[u8], rank| parse(b, rank, "x").unwrap_err().to_string();
        assert!(err(&ok[..ok.len() - 1], 3).contains("truncated"));
        assert!(err(&[ok.clone(), vec![7]].concat(), 3).contains("after"));
        assert!(err(&[1, 2, 3, 4, 5], 3).contains("not an IDX"));
        assert!(err(&[0, 0, 0x0d, 3], 3).contains("value type"));
        assert!(err(&ok, 1).contains("rank 3"));
        assert!(err(&ok[..9], 3).contains("header"));
        // A header promising 2^32 × 2^32 values is refused from the length, not allocated.
        assert!(err(&header(3, &[u32::MAX, u32::MAX, u32::MAX]), 3).contains("truncated"));
    }
}
