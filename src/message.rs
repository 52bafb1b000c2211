//! The formats of ring messages: the one list of what a producer may write on a ring
//! and how a consumer reads it back.
//!
//! The ring itself ([`crate::ring`]) carries a `u16` format with every message and only
//! asks whether a format is *headed* (the message starts with a header whose first four
//! bytes give its length, handed to the consumer apart from the body). Everything else
//! here is for the encoders and decoders in the bindings (`py/ring.rs` for queues,
//! `py/pool.rs` for pools), and for tests that build messages by hand.
//!
//! # Queue messages
//!
//! | format     | body                                                           |
//! |------------|----------------------------------------------------------------|
//! | `Pickle`   | a pickle                                                       |
//! | `Envelope` | header, in-band pickle, out-of-band payloads ([`envelope_head`]) |
//! | `Int`      | an `i64`, little endian                                        |
//! | `Str`      | UTF-8, at most [`PLAIN_MAX`] bytes                            |
//! | `Bytes`    | the bytes themselves, at most [`PLAIN_MAX`]                   |
//! | `Float`    | an `f64`'s bits, little endian                                 |
//! | `Const`    | one byte: 0 None, 1 False, 2 True                              |
//!
//! # Pool messages (every one tagged with a 64-bit task number)
//!
//! | format         | body                                                        |
//! |----------------|-------------------------------------------------------------|
//! | `Tagged`       | an envelope whose header also holds the tag (a plain pickle is an envelope without payloads) |
//! | `Packed`       | [`native_head`] (element kind, count), then the packed numbers (`py/packed.rs`) |
//! | `TaggedNative` | [`native_head`] (scalar format, length), then one scalar as above |
//! | `TaggedCall`   | [`native_head`] (argument's scalar format, key length), then a function's pickle and one scalar argument: the task `func(arg)` |

use crate::error::{Error, Result};

/// Longest `str` or `bytes` (in bytes of its encoding) that travels as a plain scalar:
/// natively on a ring, or through the plain pickler in Python (`reduction.is_plain`).
/// A longer one takes the pickler's path, where a large payload goes out of band (an
/// envelope) or, in a pool, through shared memory.
pub const PLAIN_MAX: usize = 1 << 15;

/// Most out-of-band payloads one envelope carries (its header then fits any first
/// chunk of a message).
pub const MAX_PAYLOADS: usize = 60;

/// Bytes of an envelope's fixed header (see [`envelope_head`]).
pub const ENVELOPE_HEAD: usize = 16;

/// Bytes of a tagged envelope's fixed header, and of a [`native_head`].
pub const TAGGED_HEAD: usize = 24;

/// An out-of-band payload rebuilt as `bytes`.
pub const PAYLOAD_BYTES: u64 = 0;
/// An out-of-band payload rebuilt as `bytearray`.
pub const PAYLOAD_BYTEARRAY: u64 = 1;
/// An out-of-band payload rebuilt as `str` (UTF-8, lone surrogates passed through).
pub const PAYLOAD_STR: u64 = 2;

/// What a message is (see the tables above).
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Pickle = 0,
    Envelope = 1,
    Int = 2,
    Str = 3,
    Bytes = 4,
    Float = 5,
    Const = 6,
    Tagged = 7,
    Packed = 8,
    TaggedNative = 9,
    TaggedCall = 10,
}

impl Format {
    /// The format numbered `v` on the ring; an error for a number no producer writes.
    pub fn from_u16(v: u16) -> Result<Format> {
        use Format::*;
        Ok(match v {
            0 => Pickle,
            1 => Envelope,
            2 => Int,
            3 => Str,
            4 => Bytes,
            5 => Float,
            6 => Const,
            7 => Tagged,
            8 => Packed,
            9 => TaggedNative,
            10 => TaggedCall,
            _ => return Err(Error::BadLength(v as i64)),
        })
    }

    /// Whether messages of this format start with a header the consumer gets apart.
    pub fn is_headed(self) -> bool {
        use Format::*;
        matches!(self, Envelope | Tagged | Packed | TaggedNative | TaggedCall)
    }

    /// Whether this is one natively encoded scalar (`Int` to `Const`).
    pub fn is_scalar(self) -> bool {
        use Format::*;
        matches!(self, Int | Str | Bytes | Float | Const)
    }
}

/// An envelope's header: `u32` header length, `u32` payload count, `u64` in-band
/// length, then (tagged only) the `u64` tag, then per payload `u64` kind
/// ([`PAYLOAD_BYTES`], [`PAYLOAD_BYTEARRAY`] or [`PAYLOAD_STR`]) and `u64` length; all
/// little endian. The body that follows is the in-band pickle, then each payload. An
/// envelope with an empty in-band pickle and one payload stands for that payload
/// itself: a `str` or `bytes` too long to be plain travels that way, whole, unpickled.
pub fn envelope_head(tag: Option<u64>, inband: usize, payloads: &[(u64, usize)]) -> Vec<u8> {
    let fixed = if tag.is_some() {
        TAGGED_HEAD
    } else {
        ENVELOPE_HEAD
    };
    let len = fixed + 16 * payloads.len();
    let mut h = Vec::with_capacity(len);
    h.extend_from_slice(&(len as u32).to_le_bytes());
    h.extend_from_slice(&(payloads.len() as u32).to_le_bytes());
    h.extend_from_slice(&(inband as u64).to_le_bytes());
    if let Some(tag) = tag {
        h.extend_from_slice(&tag.to_le_bytes());
    }
    for &(kind, n) in payloads {
        h.extend_from_slice(&kind.to_le_bytes());
        h.extend_from_slice(&(n as u64).to_le_bytes());
    }
    h
}

/// An envelope's header, read back (see [`envelope_head`]).
#[derive(Debug, PartialEq, Eq)]
pub struct EnvelopeHead {
    /// The tag (0 for an untagged envelope).
    pub tag: u64,
    /// Length of the in-band pickle.
    pub inband: usize,
    /// Kind and length of each payload.
    pub payloads: Vec<(u64, usize)>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
        .ok_or(Error::BadLength(at as i64))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
        .ok_or(Error::BadLength(at as i64))
}

/// Reads the header `head` of an envelope (tagged or not) whose body is `body` bytes
/// long; an error unless the header is well formed and accounts for the body exactly.
pub fn read_envelope_head(tagged: bool, head: &[u8], body: usize) -> Result<EnvelopeHead> {
    let bad = || Error::BadLength(head.len() as i64);
    let fixed = if tagged { TAGGED_HEAD } else { ENVELOPE_HEAD };
    let count = u32_at(head, 4)? as usize;
    if count > MAX_PAYLOADS || head.len() != fixed + 16 * count {
        return Err(bad());
    }
    let inband = u64_at(head, 8)?;
    let tag = if tagged { u64_at(head, 16)? } else { 0 };
    let mut payloads = Vec::with_capacity(count);
    let mut total = inband;
    for i in 0..count {
        let kind = u64_at(head, fixed + 16 * i)?;
        let len = u64_at(head, fixed + 8 + 16 * i)?;
        if kind > PAYLOAD_STR {
            return Err(bad());
        }
        total = total.checked_add(len).ok_or_else(bad)?;
        payloads.push((kind, len as usize));
    }
    if total != body as u64 {
        return Err(Error::BadLength(body as i64));
    }
    Ok(EnvelopeHead {
        tag,
        inband: inband as usize,
        payloads,
    })
}

/// The header of a natively encoded pool message (`Packed`, `TaggedNative`,
/// `TaggedCall`): `u32` header length (24), `u32` kind (element kind or scalar
/// format), `u64` count (elements, scalar length, or function key length), `u64` tag.
pub fn native_head(kind: u32, count: u64, tag: u64) -> [u8; TAGGED_HEAD] {
    let mut h = [0u8; TAGGED_HEAD];
    h[..4].copy_from_slice(&(TAGGED_HEAD as u32).to_le_bytes());
    h[4..8].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&count.to_le_bytes());
    h[16..24].copy_from_slice(&tag.to_le_bytes());
    h
}

/// The `(kind, count, tag)` of a [`native_head`].
pub fn read_native_head(head: &[u8]) -> Result<(u32, u64, u64)> {
    if head.len() != TAGGED_HEAD {
        return Err(Error::BadLength(head.len() as i64));
    }
    Ok((u32_at(head, 4)?, u64_at(head, 8)?, u64_at(head, 16)?))
}

/// Reads the [`native_head`] of a `TaggedNative` or `TaggedCall` message (`fmt`) whose
/// body is `body` bytes long: the scalar's format, the length of the function's key
/// that comes before the argument (0 for `TaggedNative`), and the tag. An error unless
/// the kind is a scalar format and the count fits the body (`TaggedNative`: the count
/// is the scalar's length, the whole body).
pub fn read_scalar_head(fmt: Format, head: &[u8], body: usize) -> Result<(Format, usize, u64)> {
    let (kind, count, tag) = read_native_head(head)?;
    let scalar = u16::try_from(kind)
        .ok()
        .and_then(|k| Format::from_u16(k).ok())
        .filter(|f| f.is_scalar());
    let key = match fmt {
        Format::TaggedCall => Some(count).filter(|&c| c <= body as u64),
        _ => (count == body as u64).then_some(0),
    };
    match (scalar, key) {
        (Some(s), Some(k)) => Ok((s, k as usize, tag)),
        _ => Err(Error::BadLength(body as i64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_heads_read_back() {
        let p = [
            (PAYLOAD_BYTES, 70_000),
            (PAYLOAD_BYTEARRAY, 5),
            (PAYLOAD_STR, 0),
        ];
        for tag in [None, Some(42)] {
            let h = envelope_head(tag, 10, &p);
            let got = read_envelope_head(tag.is_some(), &h, 70_015).unwrap();
            assert_eq!(got.tag, tag.unwrap_or(0));
            assert_eq!((got.inband, got.payloads.as_slice()), (10, &p[..]));
            assert!(read_envelope_head(tag.is_some(), &h, 70_016).is_err());
            assert!(read_envelope_head(tag.is_some(), &h[..h.len() - 1], 70_015).is_err());
        }
    }

    #[test]
    fn bad_envelope_heads_are_refused() {
        let mut h = envelope_head(None, 1, &[(PAYLOAD_BYTES, 1)]);
        h[16..24].copy_from_slice(&7u64.to_le_bytes()); // unknown payload kind
        assert!(read_envelope_head(false, &h, 2).is_err());
        let mut h = envelope_head(None, 1, &[(PAYLOAD_BYTES, u64::MAX as usize)]);
        assert!(read_envelope_head(false, &h, 0).is_err()); // lengths overflow
        h[4..8].copy_from_slice(&1000u32.to_le_bytes()); // too many payloads
        assert!(read_envelope_head(false, &h, 0).is_err());
    }

    #[test]
    fn scalar_heads_are_checked() {
        let (int, call, native) = (Format::Int as u32, Format::TaggedCall, Format::TaggedNative);
        assert_eq!(
            read_scalar_head(call, &native_head(int, 5, 9), 13),
            Ok((Format::Int, 5, 9))
        );
        assert!(read_scalar_head(call, &native_head(int, 14, 9), 13).is_err());
        assert_eq!(
            read_scalar_head(native, &native_head(int, 8, 3), 8),
            Ok((Format::Int, 0, 3))
        );
        assert!(read_scalar_head(native, &native_head(int, 7, 3), 8).is_err());
        let tagged = Format::Tagged as u32;
        assert!(read_scalar_head(native, &native_head(tagged, 8, 3), 8).is_err());
    }

    #[test]
    fn formats_round_trip() {
        for v in 0..=10u16 {
            assert_eq!(Format::from_u16(v).unwrap() as u16, v);
        }
        assert!(Format::from_u16(11).is_err());
        assert!(Format::Tagged.is_headed() && !Format::Pickle.is_headed());
        assert!(Format::Const.is_scalar() && !Format::Tagged.is_scalar());
    }
}
