//! Parsing a raw BTF blob: the header and its sections checked, every type
//! record walked and validated (sizes, kinds, references), and the name
//! index built. Queries on the parsed types are in the parent module.

use std::path::Path;

use super::{
    BTF_MAGIC, Btf, BtfError, HEADER_LEN, Kind, RawType, SYS_VMLINUX, TYPE_LEN, TypeId, VOID,
    hash_name, read_u32,
};

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
}
