//! The built-in guest: layout, page tables, program, image and memory profile.

pub mod image;
pub mod layout;
pub mod paging;
pub mod profile;
pub mod program;
