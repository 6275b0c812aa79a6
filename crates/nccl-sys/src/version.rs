//! NCCL version numbers and the integer codes `ncclGetVersion` returns.

use std::ffi::c_int;
use std::fmt;

/// An NCCL release, `major.minor.patch`. Orders by major, then minor, then patch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Version {
    /// Major version (2 for every NCCL this crate supports).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch level.
    pub patch: u32,
}

/// The oldest NCCL this crate accepts: 2.27.0, the first with `ncclCommWindowRegister`
/// (symmetric memory).
pub const MIN_VERSION: c_int = 22700;

impl Version {
    /// `major.minor.patch`.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Decodes a version code. NCCL's `NCCL_VERSION(X,Y,Z)` is `X*1000 + Y*100 + Z` while
    /// `X <= 2 && Y <= 8`, and `X*10000 + Y*100 + Z` after, so codes of 10000 and up are the
    /// newer scheme. A negative code decodes as 0.0.0.
    pub const fn from_code(code: c_int) -> Self {
        let code = if code < 0 { 0 } else { code as u32 };
        let (major, rest) = if code >= 10_000 {
            (code / 10_000, code % 10_000)
        } else {
            (code / 1_000, code % 1_000)
        };
        Self::new(major, rest / 100, rest % 100)
    }

    /// The code NCCL's `NCCL_VERSION(major, minor, patch)` gives.
    pub const fn code(self) -> c_int {
        let scale = if self.major <= 2 && self.minor <= 8 {
            1_000
        } else {
            10_000
        };
        (self.major * scale + self.minor * 100 + self.patch) as c_int
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_codes_of_real_releases() {
        let cases = [
            (22703, Version::new(2, 27, 3), "2.27.3"),
            (22803, Version::new(2, 28, 3), "2.28.3"),
            (22809, Version::new(2, 28, 9), "2.28.9"),
            (22902, Version::new(2, 29, 2), "2.29.2"),
            (23007, Version::new(2, 30, 7), "2.30.7"),
            // Minor above 8 already takes the newer scheme.
            (21903, Version::new(2, 19, 3), "2.19.3"),
            // The old scheme: minor <= 8.
            (2804, Version::new(2, 8, 4), "2.8.4"),
            (2708, Version::new(2, 7, 8), "2.7.8"),
        ];
        for (code, version, text) in cases {
            assert_eq!(Version::from_code(code), version, "code {code}");
            assert_eq!(version.code(), code, "{version}");
            assert_eq!(version.to_string(), text);
        }
    }

    #[test]
    fn orders_by_release_not_by_code_text() {
        assert!(Version::from_code(22809) > Version::from_code(22803));
        assert!(Version::from_code(23007) > Version::from_code(22902));
        assert!(Version::from_code(21000) > Version::from_code(2804));
        assert!(Version::from_code(22605) < Version::from_code(MIN_VERSION));
        assert_eq!(Version::from_code(MIN_VERSION), Version::new(2, 27, 0));
        assert_eq!(Version::from_code(-1), Version::new(0, 0, 0));
    }
}
