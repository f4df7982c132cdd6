//! A small, panic-free reader for kernel BTF (BPF Type Format).
//!
//! Rust eBPF has no CO-RE relocations, so the agent finds the offsets of the
//! kernel struct fields its programs read in the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`) and hands them to the programs (see
//! [`crate::kernel::layout`]). This module only knows the BTF format; it knows nothing
//! about TCP.
//!
//! Scope: raw little-endian BTF (version 1) as exposed by the kernel, i.e. a
//! header, a type section and a string section. Split BTF (kernel modules) is
//! not supported: every referenced type id must be defined in the same blob.
//!
//! Every byte of the input is treated as untrusted: all reads are bounds
//! checked, every type id and string offset is validated once when the blob is
//! parsed, and walks over type chains are depth limited, so malformed or
//! cyclic input produces a [`BtfError`], never a panic.
//!
//! Lookups by name go through an index (sorted `(hash(name), type id)` pairs)
//! built once by [`Btf::from_bytes`]; parsing the ~5 MB vmlinux BTF and
//! resolving a few dozen member paths takes a few milliseconds in release.
//!
//! Files: this one (types, errors, queries), `parse` (the blob parsed and
//! validated, the index built), `writer` (test-only: synthetic blobs),
//! `tests`.

use std::path::PathBuf;

use thiserror::Error;

/// Where the running kernel exposes its own BTF.
pub const SYS_VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// `BTF_MAGIC`, read as a little-endian `u16`.
pub const BTF_MAGIC: u16 = 0xEB9F;

/// Size of the version-1 BTF header (`struct btf_header`).
const HEADER_LEN: usize = 24;
/// Size of `struct btf_type` without its trailing data.
const TYPE_LEN: usize = 12;
/// Longest modifier chain / deepest anonymous nesting we follow before calling
/// the input cyclic. Real kernels need fewer than 10.
const MAX_DEPTH: usize = 64;
/// Most members one path component may visit (anonymous members included):
/// bounds the work on malicious BTF whose anonymous members form a wide DAG.
/// The largest kernel structs have a few hundred members.
const MAX_MEMBER_VISITS: u32 = 1 << 20;

/// A BTF type id (0 is `void`).
pub type TypeId = u32;

/// Everything that can go wrong reading BTF or looking something up in it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BtfError {
    #[error("cannot read BTF from {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("BTF truncated: {what} needs {need} bytes at offset {offset}, only {have} available")]
    Truncated {
        what: &'static str,
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("not BTF: bad magic {found:#06x} (expected {BTF_MAGIC:#06x})")]
    BadMagic { found: u16 },
    #[error("big-endian BTF is not supported")]
    BigEndian,
    #[error("unsupported BTF version {0} (only version 1 is known)")]
    UnsupportedVersion(u8),
    #[error("invalid BTF header: {0}")]
    BadHeader(&'static str),
    #[error("invalid BTF string section: {0}")]
    BadStrings(&'static str),
    #[error("BTF string offset {offset} out of range (string section is {len} bytes)")]
    StringOffsetOutOfRange { offset: u32, len: usize },
    #[error("BTF type {from} references type id {id}, but there are only {count} types")]
    TypeIdOutOfRange { id: u32, from: TypeId, count: u32 },
    #[error("BTF type {id} has unknown kind {kind}")]
    UnknownKind { id: TypeId, kind: u32 },
    #[error("no {what} named {name:?} in BTF")]
    TypeNotFound { what: &'static str, name: String },
    #[error("{name} is a {kind}, not a struct or union")]
    NotComposite { name: String, kind: Kind },
    #[error("{ty} has no member {member:?}")]
    MemberNotFound { ty: String, member: String },
    #[error("invalid member path {path:?} (expected names separated by '.')")]
    InvalidPath { path: String },
    #[error("BTF type chain at type {id} is too deep or cyclic")]
    TooDeep { id: TypeId },
    #[error("BTF type {id} ({kind}) has no size")]
    NoSize { id: TypeId, kind: Kind },
    #[error("offset or size of {what} overflows")]
    Overflow { what: String },
}

/// A member found by [`Btf::member`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Bit offset from the start of the struct/union the path started at.
    pub offset_bits: u32,
    /// Size of the member's type (for a bitfield: of its declared type, e.g. 1
    /// for `u8 x:1`).
    pub size_bytes: u32,
    /// Width of a bitfield in bits; 0 = not a bitfield.
    pub bitfield_bits: u32,
}

impl Member {
    /// The byte offset, if the member starts on a byte boundary.
    pub const fn offset_bytes(&self) -> Option<u32> {
        if self.offset_bits.is_multiple_of(8) {
            Some(self.offset_bits / 8)
        } else {
            None
        }
    }
}

/// One parsed `struct btf_type`; kind-specific data stays in the blob.
#[derive(Clone, Copy, Debug)]
struct RawType {
    name_off: u32,
    kind: Kind,
    kind_flag: bool,
    vlen: u16,
    /// `size` or `type`, depending on the kind.
    size_type: u32,
    /// Absolute offset in `Btf::data` of the kind-specific data.
    extra: usize,
}

const VOID: RawType = RawType {
    name_off: 0,
    kind: Kind::Void,
    kind_flag: false,
    vlen: 0,
    size_type: 0,
    extra: 0,
};

/// A member found inside one composite: offset relative to that composite.
#[derive(Clone, Copy, Debug)]
struct Found {
    offset_bits: u64,
    type_id: TypeId,
    bitfield_bits: u32,
}

/// Parsed BTF: the blob, its type table and a name index.
pub struct Btf {
    data: Vec<u8>,
    str_start: usize,
    str_len: usize,
    /// Indexed by type id; entry 0 is `void`.
    types: Vec<RawType>,
    /// `(hash of name, type id)` for every named type, sorted.
    index: Vec<(u64, TypeId)>,
    /// Size of a pointer (from the `long` integer type; 8 if there is none).
    ptr_size: u32,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("bytes", &self.data.len())
            .field("types", &self.type_count())
            .field("ptr_size", &self.ptr_size)
            .finish()
    }
}

fn read_u32(data: &[u8], off: usize) -> Option<u32> {
    let end = off.checked_add(4)?;
    let bytes: [u8; 4] = data.get(off..end)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

/// FNV-1a: tiny, deterministic and good enough for ~100k identifiers.
fn hash_name(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Btf {
    fn word(&self, off: usize) -> Result<u32, BtfError> {
        read_u32(&self.data, off).ok_or(BtfError::Truncated {
            what: "type data",
            offset: off,
            need: 4,
            have: self.data.len().saturating_sub(off),
        })
    }

    /// The NUL-terminated string at `off` in the string section.
    fn str_at(&self, off: u32) -> Result<&[u8], BtfError> {
        let out_of_range = BtfError::StringOffsetOutOfRange {
            offset: off,
            len: self.str_len,
        };
        let strs = self
            .data
            .get(self.str_start..self.str_start + self.str_len)
            .ok_or(BtfError::BadStrings("outside the blob"))?;
        let tail = strs.get(off as usize..).ok_or(out_of_range)?;
        let nul = tail
            .iter()
            .position(|&b| b == 0)
            .ok_or(BtfError::BadStrings("not NUL-terminated"))?;
        Ok(&tail[..nul])
    }

    fn ty(&self, id: TypeId) -> Result<&RawType, BtfError> {
        self.types
            .get(id as usize)
            .ok_or(BtfError::TypeIdOutOfRange {
                id,
                from: 0,
                count: self.types.len() as u32,
            })
    }

    /// Human-readable name of a type for error messages.
    fn display_name(&self, id: TypeId) -> String {
        match self.ty(id) {
            Ok(t) => {
                let name = self.str_at(t.name_off).unwrap_or_default();
                if name.is_empty() {
                    format!("(anonymous {} [{id}])", t.kind)
                } else {
                    format!("{} {}", t.kind, String::from_utf8_lossy(name))
                }
            }
            Err(_) => format!("[{id}]"),
        }
    }

    /// Number of types including `void` (valid ids are `0..type_count()`).
    pub fn type_count(&self) -> usize {
        self.types.len()
    }

    /// Pointer size in bytes (size of `long`; 8 when the BTF has no `long`).
    pub fn pointer_size(&self) -> u32 {
        self.ptr_size
    }

    /// All type ids whose name is exactly `name`, in id order.
    fn ids_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = TypeId> + 'a {
        let h = hash_name(name.as_bytes());
        let first = self.index.partition_point(|&(k, _)| k < h);
        self.index[first..]
            .iter()
            .take_while(move |&&(k, _)| k == h)
            .map(|&(_, id)| id)
            .filter(move |&id| {
                self.ty(id)
                    .and_then(|t| self.str_at(t.name_off))
                    .is_ok_and(|n| n == name.as_bytes())
            })
    }

    /// Follows typedef/const/volatile/restrict/type_tag to the real type.
    fn skip_modifiers(&self, mut id: TypeId) -> Result<TypeId, BtfError> {
        for _ in 0..MAX_DEPTH {
            let t = self.ty(id)?;
            if !t.kind.is_modifier() {
                return Ok(id);
            }
            id = t.size_type;
        }
        Err(BtfError::TooDeep { id })
    }

    /// A struct or union named `name`: a STRUCT/UNION of that exact name is
    /// preferred over anything else (forward declarations share the name);
    /// failing that, a typedef of that name that resolves to one (so
    /// `atomic64_t` works).
    fn find_composite(&self, name: &str) -> Result<TypeId, BtfError> {
        let mut fallback = None;
        for id in self.ids_named(name) {
            let t = self.ty(id)?;
            if t.kind.is_composite() {
                return Ok(id);
            }
            if fallback.is_none() || t.kind == Kind::Typedef {
                fallback = Some(id);
            }
        }
        let Some(id) = fallback else {
            return Err(BtfError::TypeNotFound {
                what: "struct or union",
                name: name.to_owned(),
            });
        };
        let real = self.skip_modifiers(id)?;
        let t = self.ty(real)?;
        if t.kind.is_composite() {
            Ok(real)
        } else {
            Err(BtfError::NotComposite {
                name: name.to_owned(),
                kind: t.kind,
            })
        }
    }

    /// Size in bytes of a type, following modifiers and arrays.
    fn type_size(&self, id: TypeId) -> Result<u64, BtfError> {
        let mut id = id;
        let mut mult: u64 = 1;
        for _ in 0..MAX_DEPTH {
            let t = self.ty(id)?;
            let overflow = || BtfError::Overflow {
                what: format!("size of type {id}"),
            };
            match t.kind {
                Kind::Int
                | Kind::Struct
                | Kind::Union
                | Kind::Enum
                | Kind::Enum64
                | Kind::Float
                | Kind::Datasec => {
                    return mult
                        .checked_mul(u64::from(t.size_type))
                        .ok_or_else(overflow);
                }
                Kind::Ptr => {
                    return mult
                        .checked_mul(u64::from(self.ptr_size))
                        .ok_or_else(overflow);
                }
                Kind::Array => {
                    let nelems = self.word(t.extra + 8)?;
                    mult = mult.checked_mul(u64::from(nelems)).ok_or_else(overflow)?;
                    id = self.word(t.extra)?;
                }
                Kind::Typedef
                | Kind::Volatile
                | Kind::Const
                | Kind::Restrict
                | Kind::TypeTag
                | Kind::Var => id = t.size_type,
                Kind::Void | Kind::Fwd | Kind::Func | Kind::FuncProto | Kind::DeclTag => {
                    return Err(BtfError::NoSize { id, kind: t.kind });
                }
            }
        }
        Err(BtfError::TooDeep { id })
    }

    /// Decodes member `i` of composite `t`: (name_off, type, offset bits,
    /// bitfield bits).
    fn raw_member(&self, t: &RawType, i: usize) -> Result<(u32, TypeId, u64, u32), BtfError> {
        let m = t.extra + 12 * i;
        let (name_off, type_id, offset) = (self.word(m)?, self.word(m + 4)?, self.word(m + 8)?);
        if t.kind_flag {
            // kind_flag: bits 0-23 offset, bits 24-31 bitfield size.
            return Ok((
                name_off,
                type_id,
                u64::from(offset & 0xff_ffff),
                offset >> 24,
            ));
        }
        // Old encoding: a bitfield is an INT member whose INT type carries
        // the bit offset and width.
        let mt = self.ty(type_id)?;
        if mt.kind == Kind::Int {
            let enc = self.word(mt.extra)?;
            let (bits, int_off) = (enc & 0xff, (enc >> 16) & 0xff);
            if int_off != 0 || u64::from(bits) != u64::from(mt.size_type) * 8 {
                return Ok((
                    name_off,
                    type_id,
                    u64::from(offset) + u64::from(int_off),
                    bits,
                ));
            }
        }
        Ok((name_off, type_id, u64::from(offset), 0))
    }

    /// Finds member `name` of composite `id`, looking through anonymous
    /// struct/union members (in declaration order, as C does).
    fn find_member(
        &self,
        id: TypeId,
        name: &[u8],
        depth: usize,
        budget: &mut u32,
    ) -> Result<Option<Found>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::TooDeep { id });
        }
        let t = *self.ty(id)?;
        for i in 0..usize::from(t.vlen) {
            *budget = budget.checked_sub(1).ok_or(BtfError::TooDeep { id })?;
            let (name_off, type_id, offset_bits, bitfield_bits) = self.raw_member(&t, i)?;
            let mname = self.str_at(name_off)?;
            if mname.is_empty() {
                let inner = self.skip_modifiers(type_id)?;
                if self.ty(inner)?.kind.is_composite()
                    && let Some(f) = self.find_member(inner, name, depth + 1, budget)?
                {
                    return Ok(Some(Found {
                        offset_bits: f.offset_bits + offset_bits,
                        ..f
                    }));
                }
            } else if mname == name {
                return Ok(Some(Found {
                    offset_bits,
                    type_id,
                    bitfield_bits,
                }));
            }
        }
        Ok(None)
    }

    /// Resolves a dotted member path (`"__sk_common.skc_daddr"`) starting at
    /// the struct or union named `struct_name`. Anonymous struct/union members
    /// are searched transparently; modifiers are skipped when descending.
    /// The offset is relative to the start of `struct_name`.
    pub fn member(&self, struct_name: &str, path: &str) -> Result<Member, BtfError> {
        let mut cur = self.find_composite(struct_name)?;
        if path.is_empty() || path.split('.').any(str::is_empty) {
            return Err(BtfError::InvalidPath { path: path.into() });
        }
        let mut offset_bits: u64 = 0;
        let mut walked = struct_name.to_owned();
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let mut budget = MAX_MEMBER_VISITS;
            let found = self
                .find_member(cur, part.as_bytes(), 0, &mut budget)?
                .ok_or_else(|| BtfError::MemberNotFound {
                    ty: format!("{} ({walked})", self.display_name(cur)),
                    member: part.into(),
                })?;
            offset_bits += found.offset_bits;
            walked.push('.');
            walked.push_str(part);
            if parts.peek().is_none() {
                let size = self.type_size(found.type_id)?;
                let overflow = || BtfError::Overflow {
                    what: walked.clone(),
                };
                return Ok(Member {
                    offset_bits: u32::try_from(offset_bits).map_err(|_| overflow())?,
                    size_bytes: u32::try_from(size).map_err(|_| overflow())?,
                    bitfield_bits: found.bitfield_bits,
                });
            }
            let inner = self.skip_modifiers(found.type_id)?;
            let kind = self.ty(inner)?.kind;
            if !kind.is_composite() || found.bitfield_bits != 0 {
                return Err(BtfError::NotComposite { name: walked, kind });
            }
            cur = inner;
        }
        // Unreachable: the path has at least one part.
        Err(BtfError::InvalidPath { path: path.into() })
    }

    /// Type id of the struct named exactly `name` (not a forward
    /// declaration, not a typedef).
    pub fn struct_id(&self, name: &str) -> Result<TypeId, BtfError> {
        self.id_of_kind(name, Kind::Struct)
    }

    /// Type id of the function (`BTF_KIND_FUNC`) named `name`: a kfunc's id
    /// as the verifier expects it in a kfunc call.
    pub fn func_id(&self, name: &str) -> Result<TypeId, BtfError> {
        self.id_of_kind(name, Kind::Func)
    }

    fn id_of_kind(&self, name: &str, kind: Kind) -> Result<TypeId, BtfError> {
        for id in self.ids_named(name) {
            if self.ty(id)?.kind == kind {
                return Ok(id);
            }
        }
        Err(BtfError::TypeNotFound {
            what: kind.name(),
            name: name.to_owned(),
        })
    }

    /// The names of the enum `name`'s values, indexed by value, with
    /// `prefix` removed (values that are negative or above 4,096 are left
    /// out, gaps are empty strings). Empty when there is no such enum.
    pub fn enum_names(&self, name: &str, prefix: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let Some(t) = self
            .ids_named(name)
            .filter_map(|id| self.ty(id).ok().copied())
            .find(|t| t.kind == Kind::Enum)
        else {
            return out;
        };
        for i in 0..usize::from(t.vlen) {
            let (Ok(name_off), Ok(val)) =
                (self.word(t.extra + 8 * i), self.word(t.extra + 8 * i + 4))
            else {
                break;
            };
            let v = val as i32;
            let Ok(n) = self.str_at(name_off) else {
                continue;
            };
            if !(0..=4_096).contains(&v) {
                continue;
            }
            let v = v as usize;
            if out.len() <= v {
                out.resize(v + 1, String::new());
            }
            let n = String::from_utf8_lossy(n);
            out[v] = n.strip_prefix(prefix).unwrap_or(&n).to_owned();
        }
        out
    }

    /// Size in bytes of the struct or union named `name`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        let id = self.find_composite(name)?;
        Ok(self.ty(id)?.size_type)
    }
}

/// A minimal BTF writer for building synthetic blobs in tests.
mod kind;
mod parse;
pub use kind::Kind;

#[cfg(test)]
pub(crate) mod writer;

#[cfg(test)]
mod tests;
