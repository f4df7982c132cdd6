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

use std::path::{Path, PathBuf};

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

/// The BTF kinds (`BTF_KIND_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Type id 0 only (`BTF_KIND_UNKN`); never stored for a real type.
    Void,
    Int,
    Ptr,
    Array,
    Struct,
    Union,
    Enum,
    Fwd,
    Typedef,
    Volatile,
    Const,
    Restrict,
    Func,
    FuncProto,
    Var,
    Datasec,
    Float,
    DeclTag,
    TypeTag,
    Enum64,
}

impl Kind {
    fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            1 => Self::Int,
            2 => Self::Ptr,
            3 => Self::Array,
            4 => Self::Struct,
            5 => Self::Union,
            6 => Self::Enum,
            7 => Self::Fwd,
            8 => Self::Typedef,
            9 => Self::Volatile,
            10 => Self::Const,
            11 => Self::Restrict,
            12 => Self::Func,
            13 => Self::FuncProto,
            14 => Self::Var,
            15 => Self::Datasec,
            16 => Self::Float,
            17 => Self::DeclTag,
            18 => Self::TypeTag,
            19 => Self::Enum64,
            _ => return None,
        })
    }

    /// The lower-case BTF name of the kind (`"struct"`, `"typedef"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Void => "void",
            Self::Int => "int",
            Self::Ptr => "ptr",
            Self::Array => "array",
            Self::Struct => "struct",
            Self::Union => "union",
            Self::Enum => "enum",
            Self::Fwd => "fwd",
            Self::Typedef => "typedef",
            Self::Volatile => "volatile",
            Self::Const => "const",
            Self::Restrict => "restrict",
            Self::Func => "func",
            Self::FuncProto => "func_proto",
            Self::Var => "var",
            Self::Datasec => "datasec",
            Self::Float => "float",
            Self::DeclTag => "decl_tag",
            Self::TypeTag => "type_tag",
            Self::Enum64 => "enum64",
        }
    }

    /// Modifiers are skipped when descending into a member's type.
    const fn is_modifier(self) -> bool {
        matches!(
            self,
            Self::Typedef | Self::Volatile | Self::Const | Self::Restrict | Self::TypeTag
        )
    }

    const fn is_composite(self) -> bool {
        matches!(self, Self::Struct | Self::Union)
    }

    /// Bytes of kind-specific data following `struct btf_type`.
    const fn extra_len(self, vlen: usize) -> usize {
        match self {
            Self::Int | Self::Var | Self::DeclTag => 4,
            Self::Array => 12,
            Self::Struct | Self::Union | Self::Datasec | Self::Enum64 => 12 * vlen,
            Self::Enum | Self::FuncProto => 8 * vlen,
            _ => 0,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

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

/// A checked section `[hdr_len + off, hdr_len + off + len)` of the blob.
fn section(
    what: &'static str,
    total: usize,
    hdr_len: usize,
    off: u32,
    len: u32,
) -> Result<(usize, usize), BtfError> {
    let start = hdr_len
        .checked_add(off as usize)
        .ok_or(BtfError::BadHeader("section offset overflows"))?;
    let end = start
        .checked_add(len as usize)
        .ok_or(BtfError::BadHeader("section length overflows"))?;
    if end > total {
        return Err(BtfError::Truncated {
            what,
            offset: start,
            need: len as usize,
            have: total.saturating_sub(start),
        });
    }
    Ok((start, len as usize))
}

impl Btf {
    /// Reads BTF from a file (raw BTF, as in `/sys/kernel/btf/vmlinux`).
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(data)
    }

    /// Reads the running kernel's BTF ([`SYS_VMLINUX`]).
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(SYS_VMLINUX))
    }

    /// Parses and validates a raw BTF blob and builds the name index.
    pub fn from_bytes(data: Vec<u8>) -> Result<Self, BtfError> {
        if data.len() < HEADER_LEN {
            return Err(BtfError::Truncated {
                what: "header",
                offset: 0,
                need: HEADER_LEN,
                have: data.len(),
            });
        }
        let magic = u16::from_le_bytes([data[0], data[1]]);
        if magic == BTF_MAGIC.swap_bytes() {
            return Err(BtfError::BigEndian);
        }
        if magic != BTF_MAGIC {
            return Err(BtfError::BadMagic { found: magic });
        }
        if data[2] != 1 {
            return Err(BtfError::UnsupportedVersion(data[2]));
        }
        let field = |off: usize| read_u32(&data, off).ok_or(BtfError::BadHeader("short header"));
        let hdr_len = field(4)? as usize;
        if hdr_len < HEADER_LEN {
            return Err(BtfError::BadHeader("hdr_len smaller than the header"));
        }
        if hdr_len > data.len() {
            return Err(BtfError::Truncated {
                what: "header",
                offset: 0,
                need: hdr_len,
                have: data.len(),
            });
        }
        let (type_start, type_len) =
            section("type section", data.len(), hdr_len, field(8)?, field(12)?)?;
        let (str_start, str_len) = section(
            "string section",
            data.len(),
            hdr_len,
            field(16)?,
            field(20)?,
        )?;
        let strs = &data[str_start..str_start + str_len];
        match (strs.first(), strs.last()) {
            (Some(0), Some(0)) => {}
            (None, _) => return Err(BtfError::BadStrings("empty")),
            (Some(0), _) => return Err(BtfError::BadStrings("not NUL-terminated")),
            _ => return Err(BtfError::BadStrings("does not start with \"\"")),
        }

        let types = Self::parse_types(&data, type_start, type_len, str_len)?;
        let mut btf = Btf {
            data,
            str_start,
            str_len,
            types,
            index: Vec::new(),
            ptr_size: 8,
        };
        btf.validate_refs()?;
        btf.build_index()?;
        Ok(btf)
    }

    fn parse_types(
        data: &[u8],
        start: usize,
        len: usize,
        str_len: usize,
    ) -> Result<Vec<RawType>, BtfError> {
        let end = start + len;
        // A type is at least 12 bytes: a good capacity guess without trusting
        // anything but the section length.
        let mut types = Vec::with_capacity(len / 16 + 1);
        types.push(VOID);
        let mut pos = start;
        while pos < end {
            let id = u32::try_from(types.len()).map_err(|_| BtfError::Overflow {
                what: "type count".into(),
            })?;
            let truncated = |need: usize| BtfError::Truncated {
                what: "type",
                offset: pos,
                need,
                have: end - pos,
            };
            if end - pos < TYPE_LEN {
                return Err(truncated(TYPE_LEN));
            }
            let word = |i: usize| read_u32(data, pos + 4 * i).ok_or(truncated(TYPE_LEN));
            let (name_off, info, size_type) = (word(0)?, word(1)?, word(2)?);
            let raw_kind = (info >> 24) & 0x1f;
            let kind =
                Kind::from_raw(raw_kind).ok_or(BtfError::UnknownKind { id, kind: raw_kind })?;
            let vlen = (info & 0xffff) as u16;
            let need = TYPE_LEN + kind.extra_len(usize::from(vlen));
            if end - pos < need {
                return Err(truncated(need));
            }
            if name_off as usize >= str_len {
                return Err(BtfError::StringOffsetOutOfRange {
                    offset: name_off,
                    len: str_len,
                });
            }
            types.push(RawType {
                name_off,
                kind,
                kind_flag: info >> 31 == 1,
                vlen,
                size_type,
                extra: pos + TYPE_LEN,
            });
            pos += need;
        }
        Ok(types)
    }

    /// Checks every type id and string offset referenced by kind-specific data
    /// once, so later walks cannot go out of range (they still use checked
    /// access, this just gives better errors early).
    fn validate_refs(&self) -> Result<(), BtfError> {
        let count = self.types.len() as u32;
        for (id, t) in self.types.iter().enumerate().skip(1) {
            let from = id as TypeId;
            let check_id = |ref_id: u32| {
                if ref_id < count {
                    Ok(())
                } else {
                    Err(BtfError::TypeIdOutOfRange {
                        id: ref_id,
                        from,
                        count,
                    })
                }
            };
            let check_str = |off: u32| {
                if (off as usize) < self.str_len {
                    Ok(())
                } else {
                    Err(BtfError::StringOffsetOutOfRange {
                        offset: off,
                        len: self.str_len,
                    })
                }
            };
            let word = |off: usize| self.word(off);
            let vlen = usize::from(t.vlen);
            match t.kind {
                Kind::Ptr
                | Kind::Typedef
                | Kind::Volatile
                | Kind::Const
                | Kind::Restrict
                | Kind::Func
                | Kind::Var
                | Kind::DeclTag
                | Kind::TypeTag => check_id(t.size_type)?,
                Kind::Array => {
                    check_id(word(t.extra)?)?;
                    check_id(word(t.extra + 4)?)?;
                }
                Kind::Struct | Kind::Union => {
                    for i in 0..vlen {
                        let m = t.extra + 12 * i;
                        check_str(word(m)?)?;
                        check_id(word(m + 4)?)?;
                    }
                }
                Kind::Enum => {
                    for i in 0..vlen {
                        check_str(word(t.extra + 8 * i)?)?;
                    }
                }
                Kind::Enum64 => {
                    for i in 0..vlen {
                        check_str(word(t.extra + 12 * i)?)?;
                    }
                }
                Kind::FuncProto => {
                    check_id(t.size_type)?;
                    for i in 0..vlen {
                        let p = t.extra + 8 * i;
                        check_str(word(p)?)?;
                        check_id(word(p + 4)?)?;
                    }
                }
                Kind::Datasec => {
                    for i in 0..vlen {
                        check_id(word(t.extra + 12 * i)?)?;
                    }
                }
                Kind::Void | Kind::Int | Kind::Fwd | Kind::Float => {}
            }
        }
        Ok(())
    }

    fn build_index(&mut self) -> Result<(), BtfError> {
        let mut index = Vec::with_capacity(self.types.len());
        let mut ptr_size = None;
        for (id, t) in self.types.iter().enumerate().skip(1) {
            if t.name_off == 0 {
                continue;
            }
            let name = self.str_at(t.name_off)?;
            if name.is_empty() {
                continue;
            }
            if t.kind == Kind::Int
                && ptr_size.is_none()
                && matches!(
                    name,
                    b"long" | b"long int" | b"long unsigned int" | b"unsigned long"
                )
                && matches!(t.size_type, 4 | 8)
            {
                ptr_size = Some(t.size_type);
            }
            index.push((hash_name(name), id as TypeId));
        }
        index.sort_unstable();
        self.index = index;
        self.ptr_size = ptr_size.unwrap_or(8);
        Ok(())
    }

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

    /// Size in bytes of the struct or union named `name`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        let id = self.find_composite(name)?;
        Ok(self.ty(id)?.size_type)
    }
}

/// A minimal BTF writer for building synthetic blobs in tests.
#[cfg(test)]
pub(crate) mod writer {
    use super::BTF_MAGIC;

    pub(crate) const INT_SIGNED: u32 = 1;

    /// Member description: name ("" = anonymous), type, bit offset, bitfield
    /// bits (0 = none).
    pub(crate) type M<'a> = (&'a str, u32, u32, u32);

    #[derive(Default)]
    pub(crate) struct BtfWriter {
        types: Vec<u8>,
        strs: Vec<u8>,
        next: u32,
    }

    impl BtfWriter {
        pub(crate) fn new() -> Self {
            Self {
                types: Vec::new(),
                strs: vec![0],
                next: 1,
            }
        }

        /// The id the next added type will get.
        pub(crate) fn next_id(&self) -> u32 {
            self.next
        }

        pub(crate) fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strs.len() as u32;
            self.strs.extend_from_slice(s.as_bytes());
            self.strs.push(0);
            off
        }

        /// Appends a raw type; returns its id.
        pub(crate) fn raw(
            &mut self,
            name: &str,
            kind: u32,
            kind_flag: bool,
            vlen: u32,
            size_type: u32,
            extra: &[u32],
        ) -> u32 {
            let name_off = self.str(name);
            let info = (u32::from(kind_flag) << 31) | (kind << 24) | vlen;
            for w in [name_off, info, size_type].iter().chain(extra) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            self.next += 1;
            self.next - 1
        }

        pub(crate) fn int(&mut self, name: &str, size: u32, encoding: u32) -> u32 {
            self.raw(name, 1, false, 0, size, &[(encoding << 24) | (size * 8)])
        }
        /// INT with an explicit bit offset/width (old-style bitfield type).
        pub(crate) fn int_bits(&mut self, name: &str, size: u32, offset: u32, bits: u32) -> u32 {
            self.raw(name, 1, false, 0, size, &[(offset << 16) | bits])
        }
        pub(crate) fn ptr(&mut self, to: u32) -> u32 {
            self.raw("", 2, false, 0, to, &[])
        }
        pub(crate) fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
            self.raw("", 3, false, 0, 0, &[elem, index, n])
        }
        fn composite(&mut self, kind: u32, name: &str, size: u32, members: &[M<'_>]) -> u32 {
            let kflag = members.iter().any(|m| m.3 != 0);
            let mut extra = Vec::new();
            for &(mname, ty, off, bits) in members {
                extra.push(self.str(mname));
                extra.push(ty);
                extra.push(if kflag { (bits << 24) | off } else { off });
            }
            self.raw(name, kind, kflag, members.len() as u32, size, &extra)
        }
        pub(crate) fn struct_(&mut self, name: &str, size: u32, members: &[M<'_>]) -> u32 {
            self.composite(4, name, size, members)
        }
        pub(crate) fn union_(&mut self, name: &str, size: u32, members: &[M<'_>]) -> u32 {
            self.composite(5, name, size, members)
        }
        pub(crate) fn enum_(
            &mut self,
            name: &str,
            size: u32,
            unsigned: bool,
            vals: &[(&str, i32)],
        ) -> u32 {
            let mut extra = Vec::new();
            for &(n, v) in vals {
                extra.push(self.str(n));
                extra.push(v as u32);
            }
            self.raw(name, 6, unsigned, vals.len() as u32, size, &extra)
        }
        pub(crate) fn fwd(&mut self, name: &str, is_union: bool) -> u32 {
            self.raw(name, 7, is_union, 0, 0, &[])
        }
        pub(crate) fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.raw(name, 8, false, 0, to, &[])
        }
        pub(crate) fn volatile(&mut self, to: u32) -> u32 {
            self.raw("", 9, false, 0, to, &[])
        }
        pub(crate) fn const_(&mut self, to: u32) -> u32 {
            self.raw("", 10, false, 0, to, &[])
        }
        pub(crate) fn restrict(&mut self, to: u32) -> u32 {
            self.raw("", 11, false, 0, to, &[])
        }
        pub(crate) fn func(&mut self, name: &str, proto: u32) -> u32 {
            self.raw(name, 12, false, 0, proto, &[])
        }
        pub(crate) fn func_proto(&mut self, ret: u32, params: &[(&str, u32)]) -> u32 {
            let mut extra = Vec::new();
            for &(n, t) in params {
                extra.push(self.str(n));
                extra.push(t);
            }
            self.raw("", 13, false, params.len() as u32, ret, &extra)
        }
        pub(crate) fn var(&mut self, name: &str, ty: u32) -> u32 {
            self.raw(name, 14, false, 0, ty, &[1])
        }
        pub(crate) fn datasec(&mut self, name: &str, size: u32, vars: &[(u32, u32, u32)]) -> u32 {
            let extra: Vec<u32> = vars.iter().flat_map(|&(t, o, s)| [t, o, s]).collect();
            self.raw(name, 15, false, vars.len() as u32, size, &extra)
        }
        pub(crate) fn float(&mut self, name: &str, size: u32) -> u32 {
            self.raw(name, 16, false, 0, size, &[])
        }
        pub(crate) fn decl_tag(&mut self, name: &str, ty: u32, component: i32) -> u32 {
            self.raw(name, 17, false, 0, ty, &[component as u32])
        }
        pub(crate) fn type_tag(&mut self, name: &str, to: u32) -> u32 {
            self.raw(name, 18, false, 0, to, &[])
        }
        pub(crate) fn enum64(
            &mut self,
            name: &str,
            size: u32,
            unsigned: bool,
            vals: &[(&str, u64)],
        ) -> u32 {
            let mut extra = Vec::new();
            for &(n, v) in vals {
                extra.push(self.str(n));
                extra.push(v as u32);
                extra.push((v >> 32) as u32);
            }
            self.raw(name, 19, unsigned, vals.len() as u32, size, &extra)
        }

        /// The finished blob: header, types, strings.
        pub(crate) fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.push(1); // version
            out.push(0); // flags
            let type_len = self.types.len() as u32;
            for w in [24, 0, type_len, type_len, self.strs.len() as u32] {
                out.extend_from_slice(&u32::to_le_bytes(w));
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strs);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{BtfWriter, INT_SIGNED};
    use super::*;

    fn parse(w: &BtfWriter) -> Btf {
        match Btf::from_bytes(w.build()) {
            Ok(b) => b,
            Err(e) => panic!("synthetic BTF failed to parse: {e}"),
        }
    }

    fn m(btf: &Btf, s: &str, path: &str) -> Member {
        match btf.member(s, path) {
            Ok(m) => m,
            Err(e) => panic!("{s}.{path}: {e}"),
        }
    }

    /// A miniature `struct sock_common`-like layout exercising anonymous
    /// unions/structs, typedef chains, modifiers, bitfields, FWD + STRUCT.
    fn sample() -> BtfWriter {
        let mut w = BtfWriter::new();
        let u8_ = w.int("unsigned char", 1, 0); // 1
        let u16_ = w.int("short unsigned int", 2, 0); // 2
        let u32_ = w.int("unsigned int", 4, 0); // 3
        let s64 = w.int("long long int", 8, INT_SIGNED); // 4
        let ulong = w.int("long unsigned int", 8, 0); // 5
        let be32 = w.typedef("__be32", u32_);
        let be16 = w.typedef("__be16", u16_);
        let addrpair = w.typedef("__addrpair", s64);
        // Forward declaration before the real struct, same name.
        let fwd = w.fwd("sk_common", false);
        let _ptr_fwd = w.ptr(fwd);
        // struct { __be32 daddr; __be32 rcv_saddr; }
        let anon_s = w.struct_(
            "",
            8,
            &[("skc_daddr", be32, 0, 0), ("skc_rcv_saddr", be32, 32, 0)],
        );
        let anon_u = w.union_(
            "",
            8,
            &[("skc_addrpair", addrpair, 0, 0), ("", anon_s, 0, 0)],
        );
        // typedef struct { s64 counter; } atomic64_t;
        let a64s = w.struct_("", 8, &[("counter", s64, 0, 0)]);
        let atomic64 = w.typedef("atomic64_t", a64s);
        let vol_u8 = w.volatile(u8_);
        let const_vol = w.const_(vol_u8);
        let tdef2 = w.typedef("state_t", const_vol);
        let tdef3 = w.typedef("state2_t", tdef2);
        let arr = w.array(u8_, u32_, 16);
        let in6 = w.struct_("in6_addr", 16, &[("s6_addr", arr, 0, 0)]);
        // A named nested struct reached through a typedef + const.
        let inner = w.struct_("inner", 16, &[("x", u32_, 0, 0), ("y", ulong, 64, 0)]);
        let inner_t = w.typedef("inner_t", inner);
        let inner_c = w.const_(inner_t);
        let tagged = w.type_tag("rcu", inner_c);
        let restr = w.restrict(tagged);
        let sk = w.struct_(
            "sk_common",
            96,
            &[
                ("", anon_u, 0, 0),
                ("skc_family", u16_, 64, 0),
                ("skc_state", tdef3, 80, 0),
                ("skc_reuse", u8_, 88, 4),
                ("skc_ipv6only", u8_, 92, 1),
                ("skc_cookie", atomic64, 128, 0),
                ("skc_v6", in6, 192, 0),
                ("nested", restr, 320, 0),
                ("wide_bf", ulong, 483, 40),
                ("skc_ptr", _ptr_fwd, 576, 0),
                ("skc_arr2", arr, 640, 0),
            ],
        );
        let _ = (be16, sk);
        w
    }

    /// Mutation: `id_of_kind` ignoring the kind returns the forward
    /// declaration's id for `struct_id("fwd_then_struct")` and this fails
    /// with `left: Some(2)`, `right: Some(3)`.
    #[test]
    fn struct_and_func_ids_by_kind() {
        let mut w = BtfWriter::new();
        let int = w.int("int", 4, INT_SIGNED);
        let fwd = w.fwd("fwd_then_struct", false);
        let st = w.struct_("fwd_then_struct", 4, &[("x", int, 0, 0)]);
        let proto = w.func_proto(int, &[("a", int)]);
        let func = w.func("bpf_rdonly_cast", proto);
        let btf = parse(&w);
        assert_ne!(fwd, st);
        assert_eq!(btf.struct_id("fwd_then_struct").ok(), Some(st));
        assert_eq!(btf.func_id("bpf_rdonly_cast").ok(), Some(func));
        assert!(btf.func_id("fwd_then_struct").is_err());
        assert!(btf.struct_id("bpf_rdonly_cast").is_err());
        assert!(btf.func_id("missing").is_err());
    }

    #[test]
    fn resolves_anonymous_typedef_modifiers_bitfields() {
        let btf = parse(&sample());
        assert_eq!(
            m(&btf, "sk_common", "skc_daddr"),
            Member {
                offset_bits: 0,
                size_bytes: 4,
                bitfield_bits: 0
            }
        );
        assert_eq!(m(&btf, "sk_common", "skc_rcv_saddr").offset_bits, 32);
        assert_eq!(m(&btf, "sk_common", "skc_addrpair").size_bytes, 8);
        assert_eq!(m(&btf, "sk_common", "skc_family").offset_bits, 64);
        let st = m(&btf, "sk_common", "skc_state");
        assert_eq!(
            (st.offset_bits, st.size_bytes, st.bitfield_bits),
            (80, 1, 0)
        );
        assert_eq!(
            m(&btf, "sk_common", "skc_reuse"),
            Member {
                offset_bits: 88,
                size_bytes: 1,
                bitfield_bits: 4
            }
        );
        assert_eq!(m(&btf, "sk_common", "skc_ipv6only").bitfield_bits, 1);
        assert_eq!(m(&btf, "sk_common", "skc_ipv6only").offset_bits, 92);
        assert_eq!(m(&btf, "sk_common", "skc_ipv6only").offset_bytes(), None);
        assert_eq!(m(&btf, "sk_common", "skc_cookie").size_bytes, 8);
        assert_eq!(m(&btf, "sk_common", "skc_cookie.counter").offset_bits, 128);
        assert_eq!(m(&btf, "sk_common", "skc_v6").size_bytes, 16);
        assert_eq!(m(&btf, "sk_common", "skc_v6.s6_addr").size_bytes, 16);
        // Descends through restrict -> type_tag -> const -> typedef.
        let y = m(&btf, "sk_common", "nested.y");
        assert_eq!((y.offset_bits, y.size_bytes), (320 + 64, 8));
        assert_eq!(y.offset_bytes(), Some(48));
        assert_eq!(m(&btf, "sk_common", "wide_bf").bitfield_bits, 40);
        assert_eq!(m(&btf, "sk_common", "skc_ptr").size_bytes, 8);
        // Typedef'd anonymous struct as a root.
        assert_eq!(m(&btf, "atomic64_t", "counter").size_bytes, 8);
        assert_eq!(m(&btf, "inner_t", "y").offset_bits, 64);
        // FWD of the same name does not shadow the struct.
        assert_eq!(btf.struct_size("sk_common").ok(), Some(96));
        assert_eq!(btf.struct_size("in6_addr").ok(), Some(16));
        assert_eq!(btf.struct_size("atomic64_t").ok(), Some(8));
        assert_eq!(btf.pointer_size(), 8);
    }

    #[test]
    fn fwd_only_struct_is_not_composite() {
        let mut w = BtfWriter::new();
        w.fwd("only_fwd", false);
        let btf = parse(&w);
        assert!(matches!(
            btf.member("only_fwd", "x"),
            Err(BtfError::NotComposite {
                kind: Kind::Fwd,
                ..
            })
        ));
    }

    #[test]
    fn struct_preferred_over_fwd_declared_after() {
        let mut w = BtfWriter::new();
        let u32_ = w.int("unsigned int", 4, 0);
        w.struct_("s", 8, &[("a", u32_, 32, 0)]);
        w.fwd("s", false);
        w.typedef("s", u32_);
        let btf = parse(&w);
        assert_eq!(m(&btf, "s", "a").offset_bits, 32);
    }

    #[test]
    fn old_style_int_bitfields_without_kind_flag() {
        let mut w = BtfWriter::new();
        let u32_ = w.int("unsigned int", 4, 0);
        let bf3 = w.int_bits("unsigned int", 4, 0, 3);
        let bf_off = w.int_bits("unsigned int", 4, 2, 5);
        // Members written with kind_flag = 0 (no bitfield in M tuples).
        w.struct_(
            "old",
            8,
            &[("a", u32_, 0, 0), ("b", bf3, 32, 0), ("c", bf_off, 35, 0)],
        );
        let btf = parse(&w);
        assert_eq!(m(&btf, "old", "a").bitfield_bits, 0);
        assert_eq!(
            m(&btf, "old", "b"),
            Member {
                offset_bits: 32,
                size_bytes: 4,
                bitfield_bits: 3
            }
        );
        assert_eq!(
            m(&btf, "old", "c"),
            Member {
                offset_bits: 37,
                size_bytes: 4,
                bitfield_bits: 5
            }
        );
    }

    /// One type of every kind, so the walker must get every kind's trailing
    /// data size right to find the struct at the end.
    fn all_kinds() -> BtfWriter {
        let mut w = BtfWriter::new();
        let int = w.int("int", 4, INT_SIGNED); // 1 INT
        let ptr = w.ptr(int); // 2 PTR
        let arr = w.array(int, int, 3); // 3 ARRAY
        let e = w.enum_("color", 4, false, &[("RED", -1), ("GREEN", 7)]); // 6 ENUM
        let ue = w.enum_("ucolor", 4, true, &[("BIG", -1)]);
        w.fwd("later", true); // 7 FWD (union)
        let td = w.typedef("int_t", int); // 8 TYPEDEF
        let vol = w.volatile(td); // 9
        let cst = w.const_(vol); // 10
        let res = w.restrict(ptr); // 11
        let proto = w.func_proto(int, &[("a", int), ("", 0)]); // 13
        w.func("tcp_write_timer_handler", proto); // 12
        let v = w.var("some_var", int); // 14
        w.datasec(".data", 4, &[(v, 0, 4)]); // 15
        let fl = w.float("double", 8); // 16
        let tt = w.type_tag("user", ptr); // 18
        let e64 = w.enum64("big", 8, true, &[("HUGE", 1 << 40), ("MAX", u64::MAX)]); // 19
        let te = w.typedef("color_t", e);
        let un = w.union_("later", 8, &[("i", int, 0, 0), ("f", fl, 0, 0)]); // 5 UNION
        w.decl_tag("kfunc", un, -1); // 17
        w.struct_(
            "all", // 4 STRUCT
            64,
            &[
                ("i", cst, 0, 0),
                ("p", res, 64, 0),
                ("a", arr, 128, 0),
                ("e", te, 224, 0),
                ("u", un, 256, 0),
                ("t", tt, 320, 0),
                ("e64", e64, 384, 0),
                ("ue", ue, 448, 0),
            ],
        );
        w
    }

    #[test]
    fn walks_every_kind() {
        let btf = parse(&all_kinds());
        assert_eq!(btf.type_count(), 22);
        assert_eq!(m(&btf, "all", "i").size_bytes, 4);
        assert_eq!(m(&btf, "all", "p").size_bytes, 8);
        assert_eq!(m(&btf, "all", "a").size_bytes, 12);
        assert_eq!(m(&btf, "all", "e").size_bytes, 4);
        assert_eq!(m(&btf, "all", "u.f").offset_bits, 256);
        assert_eq!(m(&btf, "all", "u.f").size_bytes, 8);
        assert_eq!(m(&btf, "later", "i").size_bytes, 4);
        assert_eq!(m(&btf, "all", "t").size_bytes, 8);
        assert_eq!(m(&btf, "all", "e64").size_bytes, 8);
    }

    #[test]
    fn lookup_errors() {
        let btf = parse(&sample());
        assert!(matches!(
            btf.member("no_such_struct", "x"),
            Err(BtfError::TypeNotFound { .. })
        ));
        let e = btf.member("sk_common", "skc_nope").err();
        assert!(
            matches!(e, Some(BtfError::MemberNotFound { ref member, .. }) if member == "skc_nope")
        );
        assert!(e.is_some_and(|e| e.to_string().contains("struct sk_common")));
        // Non-struct root.
        assert!(matches!(
            btf.member("unsigned int", "x"),
            Err(BtfError::NotComposite {
                kind: Kind::Int,
                ..
            })
        ));
        assert!(matches!(
            btf.member("__be32", "x"),
            Err(BtfError::NotComposite {
                kind: Kind::Int,
                ..
            })
        ));
        // Descending into a non-struct member / a bitfield / an array.
        assert!(matches!(
            btf.member("sk_common", "skc_family.x"),
            Err(BtfError::NotComposite {
                kind: Kind::Int,
                ..
            })
        ));
        assert!(matches!(
            btf.member("sk_common", "skc_reuse.x"),
            Err(BtfError::NotComposite { .. })
        ));
        assert!(matches!(
            btf.member("sk_common", "skc_arr2.x"),
            Err(BtfError::NotComposite {
                kind: Kind::Array,
                ..
            })
        ));
        assert!(matches!(
            btf.member("sk_common", "skc_ptr.x"),
            Err(BtfError::NotComposite {
                kind: Kind::Ptr,
                ..
            })
        ));
        assert!(matches!(
            btf.member("sk_common", "nested.nope"),
            Err(BtfError::MemberNotFound { .. })
        ));
        for bad in ["", ".", "a..b", "skc_family.", ".skc_family"] {
            assert!(
                matches!(
                    btf.member("sk_common", bad),
                    Err(BtfError::InvalidPath { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            btf.struct_size("nope"),
            Err(BtfError::TypeNotFound { .. })
        ));
    }

    #[test]
    fn header_errors() {
        let good = sample().build();
        assert!(Btf::from_bytes(good.clone()).is_ok());

        assert!(matches!(
            Btf::from_bytes(Vec::new()),
            Err(BtfError::Truncated { what: "header", .. })
        ));
        assert!(matches!(
            Btf::from_bytes(good[..23].to_vec()),
            Err(BtfError::Truncated { what: "header", .. })
        ));
        let mut bad = good.clone();
        bad[0] = 0x12;
        assert!(matches!(
            Btf::from_bytes(bad),
            Err(BtfError::BadMagic { .. })
        ));
        let mut be = good.clone();
        be.swap(0, 1);
        assert!(matches!(Btf::from_bytes(be), Err(BtfError::BigEndian)));
        let mut v = good.clone();
        v[2] = 2;
        assert!(matches!(
            Btf::from_bytes(v),
            Err(BtfError::UnsupportedVersion(2))
        ));
        let mut h = good.clone();
        h[4..8].copy_from_slice(&8u32.to_le_bytes());
        assert!(matches!(Btf::from_bytes(h), Err(BtfError::BadHeader(_))));
        let mut h = good.clone();
        h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Btf::from_bytes(h),
            Err(BtfError::Truncated { .. })
        ));
        // Section offsets pointing past the end, and overflowing.
        let mut s = good.clone();
        s[16..20].copy_from_slice(&100_000u32.to_le_bytes());
        assert!(matches!(
            Btf::from_bytes(s),
            Err(BtfError::Truncated {
                what: "string section",
                ..
            })
        ));
        let mut s = good.clone();
        s[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Btf::from_bytes(s).is_err());
        let mut s = good.clone();
        s[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        s[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Btf::from_bytes(s).is_err());
        // Empty / badly terminated string sections.
        let mut s = good.clone();
        s[20..24].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(Btf::from_bytes(s), Err(BtfError::BadStrings(_))));
        let mut s = good.clone();
        let last = s.len() - 1;
        s[last] = b'x';
        assert!(matches!(Btf::from_bytes(s), Err(BtfError::BadStrings(_))));
        // A header longer than 24 bytes (future fields) is fine.
        let mut long = good[..24].to_vec();
        long[4..8].copy_from_slice(&32u32.to_le_bytes());
        long.extend_from_slice(&[0; 8]);
        long.extend_from_slice(&good[24..]);
        let btf = Btf::from_bytes(long).ok();
        assert!(btf.is_some_and(|b| b.struct_size("sk_common").ok() == Some(96)));
        // Empty type section: only void.
        let empty = BtfWriter::new().build();
        let btf = Btf::from_bytes(empty).ok();
        assert!(btf.is_some_and(|b| b.type_count() == 1 && b.pointer_size() == 8));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let good = all_kinds().build();
        for len in 0..good.len() {
            let mut cut = good[..len].to_vec();
            assert!(Btf::from_bytes(cut.clone()).is_err(), "len {len}");
            // Same, but with the header lengths still claiming the rest: the
            // type section is cut short inside a type.
            if len > 24 {
                let type_len =
                    u32::from_le_bytes([good[12], good[13], good[14], good[15]]) as usize;
                if len < 24 + type_len {
                    let cut_types = (len - 24) as u32;
                    cut[12..16].copy_from_slice(&cut_types.to_le_bytes());
                    cut[16..20].copy_from_slice(&cut_types.to_le_bytes());
                    cut.extend_from_slice(&[0]);
                    cut[20..24].copy_from_slice(&1u32.to_le_bytes());
                    let r = Btf::from_bytes(cut);
                    // Cutting exactly between two types is valid BTF (that
                    // references types that no longer exist, or not).
                    if let Err(e) = r {
                        assert!(
                            matches!(
                                e,
                                BtfError::Truncated { .. }
                                    | BtfError::TypeIdOutOfRange { .. }
                                    | BtfError::StringOffsetOutOfRange { .. }
                            ),
                            "len {len}: {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn string_offset_out_of_range() {
        // Type name.
        let mut w = BtfWriter::new();
        w.raw("", 1, false, 0, 4, &[32]);
        let mut blob = w.build();
        blob[24..28].copy_from_slice(&5000u32.to_le_bytes());
        assert!(matches!(
            Btf::from_bytes(blob),
            Err(BtfError::StringOffsetOutOfRange { offset: 5000, .. })
        ));
        // Member name.
        let mut w = BtfWriter::new();
        let int = w.int("int", 4, 0);
        w.raw("s", 4, false, 1, 4, &[7777, int, 0]);
        assert!(matches!(
            Btf::from_bytes(w.build()),
            Err(BtfError::StringOffsetOutOfRange { offset: 7777, .. })
        ));
        // Enum value name, enum64, func_proto param name.
        for kind in [6u32, 19, 13] {
            let mut w = BtfWriter::new();
            let extra: &[u32] = if kind == 19 {
                &[9999, 0, 0]
            } else {
                &[9999, 0]
            };
            w.raw("e", kind, false, 1, if kind == 13 { 0 } else { 4 }, extra);
            assert!(
                matches!(
                    Btf::from_bytes(w.build()),
                    Err(BtfError::StringOffsetOutOfRange { .. })
                ),
                "kind {kind}"
            );
        }
    }

    #[test]
    fn type_id_out_of_range() {
        let cases: [fn(&mut BtfWriter); 10] = [
            |w| {
                w.ptr(99);
            },
            |w| {
                w.typedef("t", 1234);
            },
            |w| {
                w.array(1, 500, 2);
            },
            |w| {
                w.array(500, 1, 2);
            },
            |w| {
                w.struct_("s", 4, &[("x", 42, 0, 0)]);
            },
            |w| {
                w.func_proto(77, &[]);
            },
            |w| {
                w.func_proto(1, &[("a", 77)]);
            },
            |w| {
                w.datasec(".bss", 4, &[(88, 0, 4)]);
            },
            |w| {
                w.var("v", 66);
            },
            |w| {
                w.decl_tag("tag", 66, -1);
            },
        ];
        for (i, case) in cases.iter().enumerate() {
            let mut w = BtfWriter::new();
            w.int("int", 4, INT_SIGNED);
            case(&mut w);
            assert!(
                matches!(
                    Btf::from_bytes(w.build()),
                    Err(BtfError::TypeIdOutOfRange { .. })
                ),
                "case {i}"
            );
        }
    }

    #[test]
    fn unknown_kind() {
        let mut w = BtfWriter::new();
        w.raw("x", 20, false, 0, 0, &[]);
        assert!(matches!(
            Btf::from_bytes(w.build()),
            Err(BtfError::UnknownKind { id: 1, kind: 20 })
        ));
        let mut w = BtfWriter::new();
        w.raw("x", 0, false, 0, 0, &[]);
        assert!(matches!(
            Btf::from_bytes(w.build()),
            Err(BtfError::UnknownKind { kind: 0, .. })
        ));
    }

    #[test]
    fn cycles_are_errors_not_hangs() {
        let mut w = BtfWriter::new();
        // typedef a -> typedef b -> typedef a
        let a = w.next_id();
        w.typedef("a", a + 1);
        w.typedef("b", a);
        // A struct whose anonymous member is itself.
        let s = w.next_id();
        w.struct_("selfish", 4, &[("", s, 0, 0)]);
        // An array of itself (size loop).
        let arr = w.next_id();
        w.array(arr, arr, 1);
        let int = w.int("int", 4, 0);
        w.struct_(
            "holder",
            8,
            &[("x", a, 0, 0), ("arr", arr, 32, 0), ("i", int, 0, 0)],
        );
        let btf = parse(&w);
        assert!(matches!(
            btf.member("a", "x"),
            Err(BtfError::TooDeep { .. })
        ));
        assert!(matches!(
            btf.member("selfish", "x"),
            Err(BtfError::TooDeep { .. })
        ));
        assert!(matches!(
            btf.member("holder", "x"),
            Err(BtfError::TooDeep { .. })
        ));
        assert!(matches!(
            btf.member("holder", "arr"),
            Err(BtfError::TooDeep { .. })
        ));
        assert!(btf.member("holder", "i").is_ok());
    }

    /// Anonymous members forming a wide DAG (2^40 paths): bounded work.
    #[test]
    fn wide_anonymous_dag_is_bounded() {
        let mut w = BtfWriter::new();
        let int = w.int("int", 4, 0);
        let mut prev = w.struct_("", 4, &[("leaf", int, 0, 0)]);
        for _ in 0..40 {
            prev = w.struct_("", 4, &[("", prev, 0, 0), ("", prev, 0, 0)]);
        }
        w.struct_("dag", 4, &[("", prev, 0, 0)]);
        let btf = parse(&w);
        assert_eq!(m(&btf, "dag", "leaf").offset_bits, 0);
        let start = std::time::Instant::now();
        assert!(matches!(
            btf.member("dag", "nope"),
            Err(BtfError::TooDeep { .. })
        ));
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn sizes_of_unsized_and_huge_types() {
        let mut w = BtfWriter::new();
        let int = w.int("int", 4, 0);
        let proto = w.func_proto(int, &[]);
        let big = w.array(int, int, u32::MAX);
        let bigger = w.array(big, int, u32::MAX);
        w.struct_(
            "s",
            8,
            &[
                ("f", proto, 0, 0),
                ("v", 0, 0, 0),
                ("big", big, 0, 0),
                ("bigger", bigger, 0, 0),
            ],
        );
        // Offsets that overflow u32 bits when accumulated.
        let far = w.struct_("far", 8, &[("x", int, 0xf000_0000, 0)]);
        w.struct_("far_holder", 8, &[("a", far, 0xf000_0000, 0)]);
        let btf = parse(&w);
        assert!(matches!(
            btf.member("s", "f"),
            Err(BtfError::NoSize {
                kind: Kind::FuncProto,
                ..
            })
        ));
        assert!(matches!(
            btf.member("s", "v"),
            Err(BtfError::NoSize {
                kind: Kind::Void,
                ..
            })
        ));
        assert!(matches!(
            btf.member("s", "big"),
            Err(BtfError::Overflow { .. })
        ));
        assert!(matches!(
            btf.member("s", "bigger"),
            Err(BtfError::Overflow { .. })
        ));
        assert_eq!(btf.struct_size("far_holder").ok(), Some(8));
        assert_eq!(m(&btf, "far", "x").offset_bits, 0xf000_0000);
        assert!(matches!(
            btf.member("far_holder", "a.x"),
            Err(BtfError::Overflow { .. })
        ));
    }

    #[test]
    fn pointer_size_from_long() {
        let mut w = BtfWriter::new();
        let l = w.int("long int", 4, INT_SIGNED);
        let p = w.ptr(l);
        w.struct_("s", 8, &[("p", p, 0, 0)]);
        let btf = parse(&w);
        assert_eq!(btf.pointer_size(), 4);
        assert_eq!(m(&btf, "s", "p").size_bytes, 4);
    }

    /// Random byte flips over valid blobs must never panic or hang.
    #[test]
    fn mutated_blobs_never_panic() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for base in [sample().build(), all_kinds().build()] {
            for _ in 0..3000 {
                let mut b = base.clone();
                for _ in 0..(rnd() % 4 + 1) {
                    let i = (rnd() as usize) % b.len();
                    b[i] = rnd() as u8;
                }
                if let Ok(btf) = Btf::from_bytes(b) {
                    for (s, p) in [
                        ("sk_common", "skc_daddr"),
                        ("sk_common", "nested.y"),
                        ("sk_common", "skc_cookie.counter"),
                        ("all", "u.f"),
                        ("all", "a"),
                        ("atomic64_t", "counter"),
                    ] {
                        let _ = btf.member(s, p);
                        let _ = btf.struct_size(s);
                    }
                }
            }
        }
    }

    #[test]
    fn from_file_missing_is_io_error() {
        let r = Btf::from_file(Path::new("/nonexistent/tcpstall/vmlinux"));
        assert!(matches!(r, Err(BtfError::Io { .. })));
        assert!(
            r.err()
                .is_some_and(|e| e.to_string().contains("/nonexistent/tcpstall/vmlinux"))
        );
    }

    /// The running kernel's BTF. Missing BTF is a failure, not a skip: the
    /// agent cannot work without it.
    #[test]
    fn sys_vmlinux_basics() {
        let btf = match Btf::from_sys_fs() {
            Ok(b) => b,
            Err(e) => panic!(
                "{SYS_VMLINUX} is required for this test (kernel built without CONFIG_DEBUG_INFO_BTF?): {e}"
            ),
        };
        assert!(btf.type_count() > 10_000, "{btf:?}");
        assert_eq!(btf.pointer_size(), 8);
        let daddr = m(&btf, "sock", "__sk_common.skc_daddr");
        assert_eq!((daddr.offset_bits, daddr.size_bytes), (0, 4));
        assert_eq!(m(&btf, "sock_common", "skc_dport").size_bytes, 2);
        assert!(btf.struct_size("tcp_sock").is_ok_and(|s| s > 1000));
        assert_eq!(btf.struct_size("timer_list").ok(), Some(40));
    }
}
