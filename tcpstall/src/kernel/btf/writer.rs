//! A minimal BTF writer for building synthetic blobs in tests.

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
