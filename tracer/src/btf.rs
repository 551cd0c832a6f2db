//! Just enough BTF to find struct member offsets in the running kernel (`/sys/kernel/btf/vmlinux`).
//!
//! The drop tracepoint reads `sk_buff` fields by offset; those move between kernels, and BTF is
//! where the running kernel says where they are. Anonymous unions/structs (the kernel's
//! `struct_group`s) are searched through.
use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("reading {0}: {1}")]
    Read(String, String),
    #[error("not BTF (bad magic or header)")]
    Header,
    #[error("BTF truncated at type {0}")]
    Truncated(u32),
    #[error("struct {0} not found in BTF")]
    NoStruct(String),
    #[error("member {1} not found in struct {0}")]
    NoMember(String, String),
    #[error("member {1} of struct {0} is a bitfield")]
    Bitfield(String, String),
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield: bool,
}

struct Type {
    name_off: u32,
    kind: u32,
    /// For typedef/const/volatile/...: the referenced type.
    ref_type: u32,
    members: Vec<Member>,
}

pub struct Btf {
    strings: Vec<u8>,
    types: Vec<Type>,
    by_name: HashMap<String, Vec<u32>>,
}

/// How deep anonymous structs and unions are searched for a member.
pub const MAX_ANON_DEPTH: u32 = 32;

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|e| BtfError::Read(path.into(), e.to_string()))?;
        Btf::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        // Header: magic u16, version u8, flags u8, hdr_len u32, type_off, type_len, str_off, str_len.
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Header);
        }
        let hdr_len = u32_at(data, 4).ok_or(BtfError::Header)? as usize;
        let type_off = u32_at(data, 8).ok_or(BtfError::Header)? as usize;
        let type_len = u32_at(data, 12).ok_or(BtfError::Header)? as usize;
        let str_off = u32_at(data, 16).ok_or(BtfError::Header)? as usize;
        let str_len = u32_at(data, 20).ok_or(BtfError::Header)? as usize;
        let types_bytes = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Header)?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Header)?
            .to_vec();
        // Type id 0 is void.
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            ref_type: 0,
            members: Vec::new(),
        }];
        let mut off = 0usize;
        while off < types_bytes.len() {
            let id = types.len() as u32;
            let name_off = u32_at(types_bytes, off).ok_or(BtfError::Truncated(id))?;
            let info = u32_at(types_bytes, off + 4).ok_or(BtfError::Truncated(id))?;
            let size_or_type = u32_at(types_bytes, off + 8).ok_or(BtfError::Truncated(id))?;
            off += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // int, var, decl_tag
                3 => 12,          // array
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = off + i * 12;
                        let name_off = u32_at(types_bytes, m).ok_or(BtfError::Truncated(id))?;
                        let type_id = u32_at(types_bytes, m + 4).ok_or(BtfError::Truncated(id))?;
                        let raw = u32_at(types_bytes, m + 8).ok_or(BtfError::Truncated(id))?;
                        let (bit_offset, bitfield) = if kind_flag {
                            (raw & 0x00ff_ffff, raw >> 24 != 0)
                        } else {
                            (raw, false)
                        };
                        members.push(Member {
                            name_off,
                            type_id,
                            bit_offset,
                            bitfield,
                        });
                    }
                    12 * vlen
                }
                6 | 13 => 8 * vlen,   // enum, func_proto
                15 | 19 => 12 * vlen, // datasec, enum64
                _ => 0,
            };
            off += extra;
            if off > types_bytes.len() {
                return Err(BtfError::Truncated(id));
            }
            types.push(Type {
                name_off,
                kind,
                ref_type: size_or_type,
                members,
            });
        }
        let mut btf = Btf {
            strings,
            types,
            by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT || t.kind == KIND_UNION {
                let name = btf.name(t.name_off).to_string();
                if !name.is_empty() {
                    btf.by_name.entry(name).or_default().push(id as u32);
                }
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let start = off as usize;
        let Some(rest) = self.strings.get(start..) else {
            return "";
        };
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous members (at most
    /// [`MAX_ANON_DEPTH`] levels).
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let ids = self
            .by_name
            .get(name)
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))?;
        // Forward declarations have no members; take the definition that has them.
        for id in ids {
            if let Some(bits) = self.find(*id, member, 0, name, 0)? {
                return Ok(bits / 8);
            }
        }
        Err(BtfError::NoMember(name.to_string(), member.to_string()))
    }

    fn find(
        &self,
        id: u32,
        member: &str,
        base_bits: u32,
        sname: &str,
        depth: u32,
    ) -> Result<Option<u32>, BtfError> {
        // Real kernels nest anonymous members a few levels deep; a crafted or corrupt BTF could
        // make a struct contain itself.
        if depth > MAX_ANON_DEPTH {
            return Ok(None);
        }
        let Some(t) = self.types.get(id as usize) else {
            return Ok(None);
        };
        for m in &t.members {
            let mname = self.name(m.name_off);
            if mname == member {
                if m.bitfield {
                    return Err(BtfError::Bitfield(sname.to_string(), member.to_string()));
                }
                return Ok(Some(base_bits + m.bit_offset));
            }
            if mname.is_empty() {
                let inner = self.resolve(m.type_id);
                let bits = base_bits.saturating_add(m.bit_offset);
                if let Some(found) = self.find(inner, member, bits, sname, depth + 1)? {
                    return Ok(Some(found));
                }
            }
        }
        Ok(None)
    }

    /// Follows typedef/const/volatile to a struct or union.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.types.get(id as usize) {
                Some(t) if matches!(t.kind, 8..=11 | 18) => id = t.ref_type,
                _ => break,
            }
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sk_buff_members_in_the_running_kernel() -> Result<(), BtfError> {
        let btf = Btf::from_sys_fs()?;
        let head = btf.member_offset("sk_buff", "head")?;
        let nh = btf.member_offset("sk_buff", "network_header")?;
        let dev = btf.member_offset("sk_buff", "dev")?;
        let ifindex = btf.member_offset("net_device", "ifindex")?;
        assert!(head > 0 && nh > 0 && ifindex > 0);
        assert_ne!(head, nh);
        // `dev` shares a union with the rbtree node at the start of sk_buff.
        assert!(dev < 32, "dev at {dev}");
        assert!(matches!(
            btf.member_offset("sk_buff", "no_such_field"),
            Err(BtfError::NoMember(..))
        ));
        assert!(matches!(
            btf.member_offset("no_such_struct", "x"),
            Err(BtfError::NoStruct(..))
        ));
        Ok(())
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(Btf::parse(&[]).err(), Some(BtfError::Header));
        let mut hdr = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        hdr.extend_from_slice(&[0, 0, 0, 0, 200, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(Btf::parse(&hdr).is_err());
        let mut ok_hdr = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        // One struct type whose member array runs past the end.
        ok_hdr.extend_from_slice(&[0, 0, 0, 0, 12, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0]);
        ok_hdr.extend_from_slice(&[0, 0, 0, 0, 5, 0, 0, 0x04, 8, 0, 0, 0]);
        ok_hdr.push(0);
        assert!(Btf::parse(&ok_hdr).is_err());
    }

    #[test]
    fn a_struct_that_contains_itself_ends_the_walk() {
        // struct s (type 1) { struct s; } : an anonymous member of its own type.
        let mut b = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        b.extend_from_slice(&[0, 0, 0, 0, 24, 0, 0, 0, 24, 0, 0, 0, 3, 0, 0, 0]);
        b.extend_from_slice(&[1, 0, 0, 0, 1, 0, 0, 0x04, 8, 0, 0, 0]);
        b.extend_from_slice(&[0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(b"\0s\0");
        let btf = Btf::parse(&b);
        assert!(btf.is_ok(), "{:?}", btf.as_ref().err());
        if let Ok(btf) = btf {
            assert!(matches!(
                btf.member_offset("s", "x"),
                Err(BtfError::NoMember(..))
            ));
        }
    }
}
