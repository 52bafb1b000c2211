//! One C integer or floating-point scalar in shared memory, read and written with
//! atomics of its size: how `sharedctypes.Value('i').value` becomes a load under the
//! lock, without ctypes' field descriptor and generic getter (see `py/shm.rs`).
//!
//! The accesses are relaxed atomics: the same single `mov` as ctypes' plain access,
//! and well-defined even if another process writes at the same time (a `RawValue`, or
//! a writer that ignores the lock).

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

/// A value as loaded from, or about to be stored to, a [`Scalar`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bits {
    Int(i64),
    UInt(u64),
    Float(f64),
}

/// Where a scalar is and what C type it has.
pub struct Scalar {
    /// Aligned to `size`, inside a mapping that outlives `self` (see [`Scalar::new`]).
    addr: usize,
    /// 1, 2, 4 or 8 bytes.
    size: usize,
    signed: bool,
    float: bool,
}

impl Scalar {
    /// The scalar at `addr` whose ctypes `_type_` code is `code` and size `size`, if it
    /// is one of the integer or floating-point types whose value is a plain load or
    /// store and `addr` is aligned for it.
    ///
    /// # Safety
    ///
    /// `addr` points to `size` bytes of a mapping that stays mapped for as long as the
    /// returned value is used, and those bytes are only ever accessed as this type.
    pub unsafe fn new(addr: usize, code: &str, size: usize) -> Option<Scalar> {
        let (signed, float) = match code {
            "b" | "h" | "i" | "l" | "q" => (true, false),
            "B" | "H" | "I" | "L" | "Q" => (false, false),
            "f" | "d" => (true, true),
            _ => return None,
        };
        let fits = if float {
            size == 4 && code == "f" || size == 8 && code == "d"
        } else {
            matches!(size, 1 | 2 | 4 | 8)
        };
        (fits && addr != 0 && addr % size == 0).then_some(Scalar {
            addr,
            size,
            signed,
            float,
        })
    }

    /// Whether it is a `float` or `double`.
    pub fn is_float(&self) -> bool {
        self.float
    }

    /// Its value: `Float` for the float types, `Int` for the signed integers, `UInt`
    /// for the unsigned ones.
    pub fn load(&self) -> Bits {
        let (p, r) = (self.addr, Ordering::Relaxed);
        // SAFETY: (every arm) `addr` is aligned for the type and points into a live
        // mapping of at least `size` bytes, accessed only as this type (`new`'s contract).
        let u = unsafe {
            match self.size {
                1 => AtomicU8::from_ptr(p as *mut u8).load(r).into(),
                2 => AtomicU16::from_ptr(p as *mut u16).load(r).into(),
                4 => AtomicU32::from_ptr(p as *mut u32).load(r).into(),
                _ => AtomicU64::from_ptr(p as *mut u64).load(r),
            }
        };
        match (self.float, self.signed) {
            (true, _) if self.size == 4 => Bits::Float(f32::from_bits(u as u32).into()),
            (true, _) => Bits::Float(f64::from_bits(u)),
            (false, true) => {
                // Sign-extend the low `size` bytes.
                let shift = 64 - 8 * self.size as u32;
                Bits::Int(((u << shift) as i64) >> shift)
            }
            (false, false) => Bits::UInt(u),
        }
    }

    /// Stores `bits`: an integer's low bytes for the integer types, as ctypes' masking
    /// setters do; a `Float` for the float types (a `float` gets the double converted
    /// as C converts it).
    pub fn store(&self, bits: Bits) {
        let u = match bits {
            Bits::UInt(u) => u,
            Bits::Int(i) => i as u64,
            Bits::Float(f) if self.size == 4 => (f as f32).to_bits().into(),
            Bits::Float(f) => f.to_bits(),
        };
        let (p, r) = (self.addr, Ordering::Relaxed);
        // SAFETY: (every arm) as in `load`. The truncating casts keep the low bytes.
        unsafe {
            match self.size {
                1 => AtomicU8::from_ptr(p as *mut u8).store(u as u8, r),
                2 => AtomicU16::from_ptr(p as *mut u16).store(u as u16, r),
                4 => AtomicU32::from_ptr(p as *mut u32).store(u as u32, r),
                _ => AtomicU64::from_ptr(p as *mut u64).store(u, r),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_each_type() {
        let mut word = 0u64;
        let addr = &mut word as *mut u64 as usize;
        // SAFETY: `word` outlives each scalar and is only accessed through it.
        let at = |code, size| unsafe { Scalar::new(addr, code, size) }.unwrap();
        at("b", 1).store(Bits::UInt(0x1ff));
        assert_eq!(at("b", 1).load(), Bits::Int(-1));
        assert_eq!(at("B", 1).load(), Bits::UInt(0xff));
        at("i", 4).store(Bits::Int(-5));
        assert_eq!(at("i", 4).load(), Bits::Int(-5));
        assert_eq!(at("I", 4).load(), Bits::UInt(0xffff_fffb));
        at("q", 8).store(Bits::UInt(u64::MAX));
        assert_eq!(at("q", 8).load(), Bits::Int(-1));
        at("d", 8).store(Bits::Float(2.5));
        assert_eq!(at("d", 8).load(), Bits::Float(2.5));
        at("f", 4).store(Bits::Float(0.1));
        assert_eq!(at("f", 4).load(), Bits::Float(0.1f32.into()));
    }

    #[test]
    fn refuses_other_types_and_misalignment() {
        let word = [0u64; 2];
        let addr = word.as_ptr() as usize;
        // SAFETY: none of these is used.
        unsafe {
            assert!(Scalar::new(addr, "c", 1).is_none());
            assert!(Scalar::new(addr, "f", 8).is_none());
            assert!(Scalar::new(addr, "i", 3).is_none());
            assert!(Scalar::new(addr + 1, "i", 4).is_none());
            assert!(Scalar::new(0, "i", 4).is_none());
        }
    }
}
