//! The image every guest loads at [`IMAGE_GPA`](super::layout::IMAGE_GPA): a file
//! given with `--image`, or a deterministic pseudo-random stand-in.

use std::path::{Path, PathBuf};
use thiserror::Error;

/// An image that could not be prepared.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The image file could not be read.
    #[error("cannot read image file {path} (expected a readable regular file)")]
    Unreadable {
        /// The path the user gave.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The image file is empty.
    #[error("image file {path} is empty: expected at least one byte")]
    Empty {
        /// The path the user gave.
        path: PathBuf,
    },
}

/// Seed of the built-in image; the same in every guest and every run.
pub const DEFAULT_IMAGE_SEED: u64 = 0x6d65_6d76_6972_7421;

/// Bytes of an image, shared by all guests of a run.
#[derive(Debug, Clone)]
pub struct Image {
    bytes: Vec<u8>,
    /// Where it came from, for reports.
    pub source: String,
}

impl Image {
    /// Reads an image file.
    pub fn from_file(path: &Path) -> Result<Self, ImageError> {
        let bytes = std::fs::read(path).map_err(|source| ImageError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        if bytes.is_empty() {
            return Err(ImageError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Image {
            bytes,
            source: path.display().to_string(),
        })
    }

    /// A deterministic pseudo-random image of `size` bytes (splitmix64 stream).
    pub fn pseudo_random(size: u64, seed: u64) -> Self {
        let mut bytes = vec![0u8; size as usize];
        fill_pseudo_random(&mut bytes, seed);
        Image {
            bytes,
            source: format!("built-in pseudo-random image (seed {seed:#x})"),
        }
    }

    /// The image's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The image's length in bytes.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Whether the image is empty (never, for a constructed image).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Fills `buf` with a splitmix64 stream; each 64 KiB chunk is seeded from its
/// position, so chunks are generated in parallel and the result does not depend on
/// the number of threads.
pub fn fill_pseudo_random(buf: &mut [u8], seed: u64) {
    use rayon::prelude::*;
    const CHUNK: usize = 64 * 1024;
    buf.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut state = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for word in chunk.chunks_mut(8) {
                let v = splitmix64(&mut state).to_le_bytes();
                word.copy_from_slice(&v[..word.len()]);
            }
        });
}

/// One step of splitmix64 (Steele, Lea, Flood: "Fast splittable pseudorandom number
/// generators", OOPSLA 2014); constants from that paper.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_random_is_deterministic_and_pages_differ() {
        let a = Image::pseudo_random(1 << 20, 7);
        let b = Image::pseudo_random(1 << 20, 7);
        let c = Image::pseudo_random(1 << 20, 8);
        assert_eq!(a.bytes(), b.bytes());
        assert_ne!(a.bytes(), c.bytes());
        let pages: std::collections::HashSet<&[u8]> = a.bytes().chunks(4096).collect();
        assert_eq!(pages.len(), 256, "every page of the image is distinct");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Image::from_file(Path::new("/nonexistent/memvirt.img")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/memvirt.img"));
    }
}
