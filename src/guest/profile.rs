//! The memory profile of the built-in guest: where the image, the stamps, the unique
//! pages and the zeroed pages lie, computed once on the host and handed to the guest
//! program as its parameter block. Tests use the same numbers to check guest memory
//! from the host.

use super::layout::*;
use super::program::{Mode, Params};
use crate::units::{format_bytes, PAGE_SIZE};
use thiserror::Error;

/// A profile that does not fit the guest.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProfileError {
    /// The image does not fit in guest RAM above its load address.
    #[error("image of {image} is larger than guest RAM allows: --mem {mem} leaves {room} above the image load address {load:#x}; expected a smaller image or more --mem")]
    ImageTooLarge {
        /// Image size, formatted.
        image: String,
        /// Guest RAM, formatted.
        mem: String,
        /// Room left for the image, formatted.
        room: String,
        /// Load address.
        load: u64,
    },
    /// Unique + zeroed areas do not fit after the image.
    #[error("--unique {unique} plus --zeroed {zeroed} do not fit in the {room} of guest RAM after the image (--mem {mem}); expected at most {room} together")]
    AreasTooLarge {
        /// Unique area size, formatted.
        unique: String,
        /// Zeroed area size, formatted.
        zeroed: String,
        /// Room after the image, formatted.
        room: String,
        /// Guest RAM, formatted.
        mem: String,
    },
    /// More stamps than image pages.
    #[error("--stamps {stamps} is more than the image's {pages} pages; expected at most {pages}")]
    TooManyStamps {
        /// Stamps requested.
        stamps: u64,
        /// Image pages.
        pages: u64,
    },
    /// A size that must be page-aligned is not.
    #[error("{what} {value} is not a multiple of 4 KiB; expected a multiple of 4096 bytes")]
    Unaligned {
        /// Which option.
        what: &'static str,
        /// The value in bytes.
        value: u64,
    },
}

/// Where everything lies in one guest's RAM. The same for every guest of a run;
/// only the values written differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Image size in bytes (need not be page-aligned).
    pub image_size: u64,
    /// Number of stamped image pages.
    pub stamps: u64,
    /// Guest-physical start of the unique area.
    pub unique_gpa: u64,
    /// Pages in the unique area.
    pub unique_pages: u64,
    /// Guest-physical start of the zeroed area.
    pub zeroed_gpa: u64,
    /// Pages in the zeroed area.
    pub zeroed_pages: u64,
}

impl Profile {
    /// Lays out a profile and checks it fits.
    pub fn new(
        mem_size: u64,
        image_size: u64,
        stamps: u64,
        unique: u64,
        zeroed: u64,
    ) -> Result<Self, ProfileError> {
        for (what, value) in [("--unique", unique), ("--zeroed", zeroed)] {
            if !value.is_multiple_of(PAGE_SIZE) {
                return Err(ProfileError::Unaligned { what, value });
            }
        }
        let room = mem_size.saturating_sub(IMAGE_GPA);
        if image_size > room {
            return Err(ProfileError::ImageTooLarge {
                image: format_bytes(image_size),
                mem: format_bytes(mem_size),
                room: format_bytes(room),
                load: IMAGE_GPA,
            });
        }
        let image_pages = image_size.div_ceil(PAGE_SIZE);
        if stamps > image_pages {
            return Err(ProfileError::TooManyStamps {
                stamps,
                pages: image_pages,
            });
        }
        let unique_gpa = IMAGE_GPA + image_pages * PAGE_SIZE;
        let after_image = mem_size - unique_gpa;
        if unique + zeroed > after_image {
            return Err(ProfileError::AreasTooLarge {
                unique: format_bytes(unique),
                zeroed: format_bytes(zeroed),
                room: format_bytes(after_image),
                mem: format_bytes(mem_size),
            });
        }
        Ok(Profile {
            mem_size,
            image_size,
            stamps,
            unique_gpa,
            unique_pages: unique / PAGE_SIZE,
            zeroed_gpa: unique_gpa + unique,
            zeroed_pages: zeroed / PAGE_SIZE,
        })
    }

    /// Pages of the image.
    pub fn image_pages(&self) -> u64 {
        self.image_size.div_ceil(PAGE_SIZE)
    }

    /// Distance in pages between stamped image pages.
    pub fn stamp_stride_pages(&self) -> u64 {
        self.image_pages().checked_div(self.stamps).unwrap_or(0)
    }

    /// Guest-physical addresses of the stamped image pages.
    pub fn stamp_gpas(&self) -> impl Iterator<Item = u64> + '_ {
        let stride = self.stamp_stride_pages();
        (0..self.stamps).map(move |i| IMAGE_GPA + i * stride * PAGE_SIZE)
    }

    /// The stamp value of guest `id`.
    pub fn stamp_value(id: usize) -> u64 {
        0x5354_414d_0000_0000 | (id as u64 + 1)
    }

    /// The value written into unique page `page` of guest `id`.
    pub fn unique_value(id: usize, page: u64) -> u64 {
        0x554e_0000_0000_0000 | ((id as u64 + 1) << 32) | page
    }

    /// Pages the guest program writes while applying the profile.
    pub fn pages_written(&self) -> u64 {
        self.stamps + self.unique_pages + self.zeroed_pages
    }

    /// The parameter block for guest `id` in `mode`.
    pub fn params(&self, id: usize, mode: Mode) -> Params {
        // Stamps go through the kernel-style high-half mapping, as a kernel applies
        // its own relocations; the areas through the identity map.
        let image_base = if IMAGE_GPA + self.image_size <= HIGH_HALF_SIZE {
            HIGH_HALF_BASE + IMAGE_GPA
        } else {
            IMAGE_GPA
        };
        Params {
            mode: mode as u64,
            image_base,
            stamps: self.stamps,
            stamp_stride: self.stamp_stride_pages() * PAGE_SIZE,
            stamp_value: Self::stamp_value(id),
            unique_base: self.unique_gpa,
            unique_pages: self.unique_pages,
            unique_seed: Self::unique_value(id, 0),
            zeroed_base: self.zeroed_gpa,
            zeroed_pages: self.zeroed_pages,
            loop_count: 0,
            error_code: 0,
            delay: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::MIB;

    #[test]
    fn default_profile_fits_256m() {
        let p = Profile::new(256 * MIB, 64 * MIB, 164, 64 * MIB, 64 * MIB).unwrap();
        assert_eq!(p.unique_gpa, IMAGE_GPA + 64 * MIB);
        assert_eq!(p.zeroed_gpa, p.unique_gpa + 64 * MIB);
        assert_eq!(p.stamp_gpas().count(), 164);
        assert!(p.stamp_gpas().all(|g| g < IMAGE_GPA + 64 * MIB));
    }

    #[test]
    fn rejects_what_does_not_fit() {
        assert!(matches!(
            Profile::new(64 * MIB, 64 * MIB, 0, 0, 0),
            Err(ProfileError::ImageTooLarge { .. })
        ));
        assert!(matches!(
            Profile::new(64 * MIB, 16 * MIB, 0, 32 * MIB, 32 * MIB),
            Err(ProfileError::AreasTooLarge { .. })
        ));
        assert!(matches!(
            Profile::new(64 * MIB, 4096, 2, 0, 0),
            Err(ProfileError::TooManyStamps { .. })
        ));
    }

    #[test]
    fn values_differ_between_guests() {
        assert_ne!(Profile::stamp_value(0), Profile::stamp_value(1));
        assert_ne!(Profile::unique_value(0, 5), Profile::unique_value(1, 5));
        assert_ne!(Profile::unique_value(0, 5), Profile::unique_value(0, 6));
    }
}
