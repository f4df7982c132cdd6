//! The kernel fields the tcpstall programs read, and their resolution from BTF.
//!
//! [`FIELDS`] is the declarative table: one [`FieldDef`] per
//! [`tcpstall_common::field`] index, with the ordered candidate
//! `(struct, member path)` pairs that locate it on the kernels we know (the
//! first candidate that resolves wins: kernels rename and move fields).
//! [`resolve`] turns the table plus a kernel's BTF into a
//! [`tcpstall_common::KernelLayout`] and a per-row report for `tcpstall doctor`.
//!
//! # Encoding (what the eBPF side does with a [`FieldSpec`])
//!
//! * `size == 0`: the field is absent on this kernel; the program uses 0.
//! * otherwise read `size` bytes (1, 2, 4, 8; 16 only for the IPv6 address
//!   fields) at `offset` from the field's base object, little-endian.
//! * if `bit_len != 0` the field is a bitfield: the value is
//!   `(v >> bit_shift) & ((1 << bit_len) - 1)`. The read is the smallest
//!   naturally aligned 1/2/4/8-byte window that covers the bitfield, so
//!   `bit_shift + bit_len <= 8 * size` and `bit_len < 64` always hold. A
//!   "bitfield" that fills its whole window is encoded as a plain field.
//! * [`Access::OffsetOnly`] rows
//!   ([`field::WRITE_TIMER`](tcpstall_common::field::WRITE_TIMER)) are never
//!   read: only `offset` matters (the timer path does `container_of`). Their
//!   `size` is 8, a presence marker, not the size of the embedded
//!   `struct timer_list`.
//!
//! Bases: [`Base::Sock`] offsets are from the start of `struct sock`;
//! `inet_connection_sock` and `tcp_sock` begin with `struct sock` at offset 0
//! (checked by [`resolve`]), so their member offsets are offsets from `sock`.
//! [`Base::Net`] offsets are from `struct net`, [`Base::TimerList`] from
//! `struct timer_list`, [`Base::SkBuff`] from `struct sk_buff` and
//! [`Base::TcpSkbCb`] from `struct tcp_skb_cb` (the TCP view of
//! `sk_buff.cb`: the ACK probe reads `skb + SKB_CB + TCP_SKB_CB_ACK_SEQ`).
//!
//! Files: this one (the row types, resolution, the doctor's report),
//! `fields` (the table), `tests`.

use std::fmt;

use tcpstall_common::{FieldSpec, KernelLayout};
use thiserror::Error;

use crate::kernel::btf::{Btf, BtfError, Member};

/// The object a field's offset is relative to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    /// `struct sock` (also the start of `inet_connection_sock`, `tcp_sock`).
    Sock,
    /// `struct net`.
    Net,
    /// `struct timer_list`.
    TimerList,
    /// `struct sk_buff`.
    SkBuff,
    /// `struct tcp_skb_cb` (stored in `sk_buff.cb`).
    TcpSkbCb,
    /// `struct task_struct` (the sweep iterator's task).
    Task,
    /// `struct cgroup`.
    Cgroup,
    /// `struct kernfs_node`.
    KernfsNode,
    /// `struct inet_timewait_sock` (begins with `struct sock_common`, as
    /// `struct sock` does).
    Timewait,
}

impl Base {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Sock => "sock",
            Self::Net => "net",
            Self::TimerList => "timer_list",
            Self::SkBuff => "sk_buff",
            Self::TcpSkbCb => "tcp_skb_cb",
            Self::Task => "task_struct",
            Self::Cgroup => "cgroup",
            Self::KernfsNode => "kernfs_node",
            Self::Timewait => "tw_sock",
        }
    }
}

/// How the programs use a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A scalar read: 1, 2, 4 or 8 bytes, possibly a bitfield.
    Value,
    /// A 16-byte IPv6 address (the only 16-byte reads).
    Ipv6Addr,
    /// Only the offset is used (see the module docs); size is stored as 8.
    OffsetOnly,
}

/// One row of the field table.
#[derive(Clone, Copy, Debug)]
pub struct FieldDef {
    /// The [`tcpstall_common::field`] index.
    pub index: usize,
    /// The index constant's name (`"TP_RETRANS_STAMP"`).
    pub id: &'static str,
    /// Human name used in messages (`"tcp_sock.retrans_stamp"`).
    pub name: &'static str,
    pub base: Base,
    /// Ordered `(struct, dotted member path)` candidates; the first that
    /// resolves wins.
    pub candidates: &'static [(&'static str, &'static str)],
    /// Whether the agent refuses to run without it.
    pub required: bool,
    pub access: Access,
    /// Completes "tcpstall cannot ... on this kernel".
    pub purpose: &'static str,
    /// Version notes for `tcpstall doctor` (`"6.15+"`).
    pub note: &'static str,
}

mod fields;

pub use fields::FIELDS;
use fields::SOCK_PREFIXES;

/// The index constant's name for a [`field`](tcpstall_common::field) index (`"?"` if out of range).
pub fn field_name(index: usize) -> &'static str {
    FIELDS.get(index).map_or("?", |f| f.id)
}

/// Why the layout cannot be used on this kernel.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutError {
    #[error(
        "kernel {kernel} has no {field} (tried {}): tcpstall cannot {purpose} on this kernel",
        tried.join(", ")
    )]
    MissingField {
        field: &'static str,
        tried: Vec<String>,
        kernel: String,
        purpose: &'static str,
    },
    #[error(
        "kernel {kernel}: {field} ({candidate}) is {size} bytes; tcpstall reads only 1, 2, 4 or 8 bytes{}",
        if *ipv6 { " or a 16-byte IPv6 address" } else { "" }
    )]
    BadSize {
        field: &'static str,
        candidate: String,
        size: u32,
        ipv6: bool,
        kernel: String,
    },
    #[error(
        "kernel {kernel}: {field} ({candidate}) starts at bit {offset_bits}, not on a byte boundary"
    )]
    Unaligned {
        field: &'static str,
        candidate: String,
        offset_bits: u32,
        kernel: String,
    },
    #[error(
        "kernel {kernel}: bitfield {field} ({candidate}, {bits} bits at bit {offset_bits}) fits no aligned 1, 2, 4 or 8 byte read"
    )]
    BadBitfield {
        field: &'static str,
        candidate: String,
        offset_bits: u32,
        bits: u32,
        kernel: String,
    },
    #[error(
        "kernel {kernel}: struct {outer} does not start with struct sock ({path} is at byte {offset}); tcpstall cannot use its offsets"
    )]
    NotSockPrefixed {
        outer: &'static str,
        path: &'static str,
        offset: u32,
        kernel: String,
    },
}

/// One resolved row of the table.
#[derive(Clone, Debug)]
pub struct ResolvedRow {
    pub def: &'static FieldDef,
    /// Index into `def.candidates` of the candidate that resolved.
    pub matched: Option<usize>,
    /// What BTF said about the match.
    pub member: Option<Member>,
    /// What the programs get ([`FieldSpec::ABSENT`] if not found).
    pub spec: FieldSpec,
    /// Candidates that did not resolve, with the reason, in order.
    pub tried: Vec<String>,
}

impl ResolvedRow {
    pub fn is_present(&self) -> bool {
        self.spec.is_present()
    }

    /// `"struct.path"` of the matched candidate.
    pub fn source(&self) -> Option<String> {
        let (s, p) = self.def.candidates.get(self.matched?)?;
        Some(format!("{s}.{p}"))
    }
}

/// The resolved table for one kernel.
#[derive(Clone, Debug)]
pub struct ResolvedLayout {
    kernel: String,
    rows: Vec<ResolvedRow>,
}

impl ResolvedLayout {
    /// The kernel release this was resolved for.
    pub fn kernel(&self) -> &str {
        &self.kernel
    }

    /// The layout for [`tcpstall_common::LAYOUT_GLOBAL`]. The caller fills in
    /// `tcp_write_timer_addr`, `flags` and `ringbuf_wake_bytes` (zero here).
    pub fn layout(&self) -> KernelLayout {
        let mut l = KernelLayout::zeroed();
        for (slot, row) in l.fields.iter_mut().zip(&self.rows) {
            *slot = row.spec;
        }
        l
    }

    /// Bytes of `struct sock` from its start covering every socket field that
    /// is read ([`KernelLayout::sock_span`]); 0 when that exceeds
    /// [`tcpstall_common::SOCK_SCRATCH_BYTES`].
    pub fn sock_span(&self) -> u32 {
        let end = self
            .rows
            .iter()
            .filter(|r| r.def.base == Base::Sock && r.def.access != Access::OffsetOnly)
            .map(|r| r.spec.offset + u32::from(r.spec.size))
            .max()
            .unwrap_or(0);
        if end <= tcpstall_common::SOCK_SCRATCH_BYTES {
            end
        } else {
            0
        }
    }

    /// One row per [`field`](tcpstall_common::field) index, in index order.
    pub fn rows(&self) -> impl ExactSizeIterator<Item = &ResolvedRow> {
        self.rows.iter()
    }

    pub fn row(&self, index: usize) -> Option<&ResolvedRow> {
        self.rows.get(index)
    }

    /// The spec for a [`field`](tcpstall_common::field) index ([`FieldSpec::ABSENT`] if unknown).
    pub fn spec(&self, index: usize) -> FieldSpec {
        self.rows.get(index).map_or(FieldSpec::ABSENT, |r| r.spec)
    }

    /// Whether the field (typically an optional one) exists on this kernel.
    pub fn has(&self, index: usize) -> bool {
        self.spec(index).is_present()
    }

    /// Which candidate (index into [`FieldDef::candidates`]) matched.
    pub fn matched(&self, index: usize) -> Option<usize> {
        self.rows.get(index)?.matched
    }
}

impl fmt::Display for ResolvedLayout {
    /// The `tcpstall doctor` table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel {} field layout:", self.kernel)?;
        writeln!(
            f,
            "  {:<22} {:<10} {:>6} {:>4} {:>5}  SOURCE",
            "FIELD", "BASE", "OFFSET", "SIZE", "BITS"
        )?;
        for r in &self.rows {
            let d = r.def;
            let (offset, size, bits) = if r.is_present() {
                let bits = if r.spec.bit_len != 0 {
                    format!("{}:{}", r.spec.bit_shift, r.spec.bit_len)
                } else {
                    "-".to_owned()
                };
                (r.spec.offset.to_string(), r.spec.size.to_string(), bits)
            } else {
                ("-".to_owned(), "-".to_owned(), "-".to_owned())
            };
            let source = match r.source() {
                Some(s) if d.access == Access::OffsetOnly => format!("{s} (offset only)"),
                Some(s) => s,
                None if d.required => "MISSING (required)".to_owned(),
                None => "absent (optional)".to_owned(),
            };
            write!(
                f,
                "  {:<22} {:<10} {offset:>6} {size:>4} {bits:>5}  {source}",
                d.id,
                d.base.as_str()
            )?;
            if !d.note.is_empty() {
                write!(f, "  [{}]", d.note)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Turns a resolved member into the [`FieldSpec`] the programs use.
fn spec_for(
    def: &'static FieldDef,
    candidate: String,
    m: Member,
    kernel: &str,
) -> Result<FieldSpec, LayoutError> {
    let unaligned = |candidate: String| LayoutError::Unaligned {
        field: def.name,
        candidate,
        offset_bits: m.offset_bits,
        kernel: kernel.to_owned(),
    };
    if def.access == Access::OffsetOnly {
        if m.bitfield_bits != 0 {
            return Err(unaligned(candidate));
        }
        let offset = m.offset_bytes().ok_or_else(|| unaligned(candidate))?;
        return Ok(FieldSpec {
            offset,
            size: 8,
            bit_shift: 0,
            bit_len: 0,
        });
    }
    if m.bitfield_bits != 0 {
        return bitfield_spec(m.offset_bits, m.bitfield_bits).ok_or_else(|| {
            LayoutError::BadBitfield {
                field: def.name,
                candidate,
                offset_bits: m.offset_bits,
                bits: m.bitfield_bits,
                kernel: kernel.to_owned(),
            }
        });
    }
    let ipv6 = def.access == Access::Ipv6Addr;
    let size_ok = matches!(m.size_bytes, 1 | 2 | 4 | 8) || (ipv6 && m.size_bytes == 16);
    if !size_ok {
        return Err(LayoutError::BadSize {
            field: def.name,
            candidate,
            size: m.size_bytes,
            ipv6,
            kernel: kernel.to_owned(),
        });
    }
    let offset = m.offset_bytes().ok_or_else(|| unaligned(candidate))?;
    Ok(FieldSpec {
        offset,
        size: m.size_bytes as u16,
        bit_shift: 0,
        bit_len: 0,
    })
}

/// The smallest naturally aligned 1/2/4/8-byte window covering
/// `bits` bits at bit `offset_bits` (little-endian bit numbering).
fn bitfield_spec(offset_bits: u32, bits: u32) -> Option<FieldSpec> {
    if bits == 0 || bits > 64 {
        return None;
    }
    let end = u64::from(offset_bits) + u64::from(bits);
    for size in [1u32, 2, 4, 8] {
        let start = offset_bits / 8 / size * size;
        if end <= u64::from(start) * 8 + u64::from(size) * 8 {
            let shift = offset_bits - start * 8;
            let whole = shift == 0 && bits == size * 8;
            return Some(FieldSpec {
                offset: start,
                size: size as u16,
                bit_shift: if whole { 0 } else { shift as u8 },
                bit_len: if whole { 0 } else { bits as u8 },
            });
        }
    }
    None
}

/// Resolves every row of [`FIELDS`] against `btf`. `kernel_release` only
/// appears in messages. Fails on the first missing required field or on a
/// field tcpstall cannot read (bad size, unaligned).
pub fn resolve(btf: &Btf, kernel_release: &str) -> Result<ResolvedLayout, LayoutError> {
    for &(outer, path) in SOCK_PREFIXES {
        // A rename of the prefix path is not fatal; a nonzero offset is.
        if let Ok(m) = btf.member(outer, path)
            && m.offset_bits != 0
        {
            return Err(LayoutError::NotSockPrefixed {
                outer,
                path,
                offset: m.offset_bits / 8,
                kernel: kernel_release.to_owned(),
            });
        }
    }
    let mut rows = Vec::with_capacity(FIELDS.len());
    for def in &FIELDS {
        let mut tried = Vec::new();
        let mut found = None;
        for (i, &(s, p)) in def.candidates.iter().enumerate() {
            match btf.member(s, p) {
                Ok(m) => {
                    found = Some((i, m));
                    break;
                }
                Err(e) => tried.push(format!("{s}.{p}: {}", short_reason(&e))),
            }
        }
        let row = match found {
            Some((i, m)) => {
                let (s, p) = def.candidates[i];
                let spec = spec_for(def, format!("{s}.{p}"), m, kernel_release)?;
                ResolvedRow {
                    def,
                    matched: Some(i),
                    member: Some(m),
                    spec,
                    tried,
                }
            }
            None if def.required => {
                return Err(LayoutError::MissingField {
                    field: def.name,
                    tried,
                    kernel: kernel_release.to_owned(),
                    purpose: def.purpose,
                });
            }
            None => ResolvedRow {
                def,
                matched: None,
                member: None,
                spec: FieldSpec::ABSENT,
                tried,
            },
        };
        rows.push(row);
    }
    Ok(ResolvedLayout {
        kernel: kernel_release.to_owned(),
        rows,
    })
}

fn short_reason(e: &BtfError) -> String {
    match e {
        BtfError::TypeNotFound { .. } => "no such struct".to_owned(),
        BtfError::MemberNotFound { member, .. } => format!("no member {member}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
