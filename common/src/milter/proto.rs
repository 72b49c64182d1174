//! The milter wire protocol, version 6 (Sendmail's libmilter `mfdef.h`,
//! as Postfix's MILTER_README describes it): every packet is a 4-byte
//! big-endian length, one command or reply byte, and the data. The one
//! definition of the codes, the option bits and the packet framing.

use std::io::{self, Read, Write};

/// Commands the MTA sends.
pub mod cmd {
    pub const ABORT: u8 = b'A';
    pub const BODY: u8 = b'B';
    pub const CONNECT: u8 = b'C';
    pub const MACRO: u8 = b'D';
    pub const BODYEOB: u8 = b'E';
    pub const HELO: u8 = b'H';
    pub const QUIT_NC: u8 = b'K';
    pub const HEADER: u8 = b'L';
    pub const MAIL: u8 = b'M';
    pub const EOH: u8 = b'N';
    pub const OPTNEG: u8 = b'O';
    pub const QUIT: u8 = b'Q';
    pub const RCPT: u8 = b'R';
    pub const DATA: u8 = b'T';
    pub const UNKNOWN: u8 = b'U';
}

/// Replies and modification requests a milter sends.
pub mod rep {
    pub const ADDRCPT: u8 = b'+';
    pub const DELRCPT: u8 = b'-';
    pub const ADDRCPT_PAR: u8 = b'2';
    pub const SHUTDOWN: u8 = b'4';
    pub const ACCEPT: u8 = b'a';
    pub const REPLBODY: u8 = b'b';
    pub const CONTINUE: u8 = b'c';
    pub const DISCARD: u8 = b'd';
    pub const CHGFROM: u8 = b'e';
    pub const CONN_FAIL: u8 = b'f';
    pub const ADDHEADER: u8 = b'h';
    pub const INSHEADER: u8 = b'i';
    pub const SETSYMLIST: u8 = b'l';
    pub const CHGHEADER: u8 = b'm';
    pub const PROGRESS: u8 = b'p';
    pub const QUARANTINE: u8 = b'q';
    pub const REJECT: u8 = b'r';
    pub const SKIP: u8 = b's';
    pub const TEMPFAIL: u8 = b't';
    pub const REPLYCODE: u8 = b'y';
}

/// SMFIF_*: the modification actions a milter may ask for.
pub mod act {
    pub const ADDHDRS: u32 = 0x01;
    pub const CHGBODY: u32 = 0x02;
    pub const ADDRCPT: u32 = 0x04;
    pub const DELRCPT: u32 = 0x08;
    pub const CHGHDRS: u32 = 0x10;
    pub const QUARANTINE: u32 = 0x20;
    pub const CHGFROM: u32 = 0x40;
    pub const ADDRCPT_PAR: u32 = 0x80;
    pub const SETSYMLIST: u32 = 0x100;
    /// Everything Postern carries out.
    pub const ALL: u32 = 0x1ff;
}

/// SMFIP_*: the protocol steps a milter does not want (NO*), the ones it
/// will not answer (NR_*), and the MTA's abilities (SKIP, HDR_LEADSPC).
pub mod proto_bits {
    pub const NOCONNECT: u32 = 0x01;
    pub const NOHELO: u32 = 0x02;
    pub const NOMAIL: u32 = 0x04;
    pub const NORCPT: u32 = 0x08;
    pub const NOBODY: u32 = 0x10;
    pub const NOHDRS: u32 = 0x20;
    pub const NOEOH: u32 = 0x40;
    pub const NR_HDR: u32 = 0x80;
    pub const NOUNKNOWN: u32 = 0x100;
    pub const NODATA: u32 = 0x200;
    pub const SKIP: u32 = 0x400;
    pub const RCPT_REJ: u32 = 0x800;
    pub const NR_CONN: u32 = 0x1000;
    pub const NR_HELO: u32 = 0x2000;
    pub const NR_MAIL: u32 = 0x4000;
    pub const NR_RCPT: u32 = 0x8000;
    pub const NR_DATA: u32 = 0x10000;
    pub const NR_UNKN: u32 = 0x20000;
    pub const NR_EOH: u32 = 0x40000;
    pub const NR_BODY: u32 = 0x80000;
    pub const HDR_LEADSPC: u32 = 0x100000;
    /// What Postern offers: every NO and NR bit, SKIP, HDR_LEADSPC and
    /// RCPT_REJ (smtpd shows the recipients it refused to the milters
    /// that ask for them).
    pub const OFFERED: u32 = 0x1f_ffff;
}

/// SMFIM_*: the stages of a SETSYMLIST macro list.
pub mod stage {
    pub const CONNECT: u32 = 0;
    pub const HELO: u32 = 1;
    pub const ENVFROM: u32 = 2;
    pub const ENVRCPT: u32 = 3;
    pub const DATA: u32 = 4;
    pub const EOM: u32 = 5;
    pub const EOH: u32 = 6;
}

/// The largest body chunk (SMFIC_BODY) sent at once.
pub const MAX_BODY_CHUNK: usize = 65535;
/// The largest packet accepted from a milter (a replaced body comes in
/// chunks; libmilter's own limit is near this).
pub const MAX_PACKET: usize = 1 << 20;

/// Writes one packet.
pub fn write_packet(w: &mut impl Write, code: u8, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len() + 1)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "milter packet too large"))?;
    let mut buf = Vec::with_capacity(5 + data.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.push(code);
    buf.extend_from_slice(data);
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one packet: (code, data).
pub fn read_packet(r: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_PACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("milter packet length {len}"),
        ));
    }
    let mut code = [0u8; 1];
    r.read_exact(&mut code)?;
    let mut data = vec![0u8; len - 1];
    r.read_exact(&mut data)?;
    Ok((code[0], data))
}

/// Strings joined with a NUL after each (the milter string list form).
pub fn nul_strings<S: AsRef<[u8]>>(items: &[S]) -> Vec<u8> {
    let mut v = Vec::new();
    for i in items {
        v.extend_from_slice(i.as_ref());
        v.push(0);
    }
    v
}

/// The NUL-terminated strings of a packet's data.
pub fn split_nul(data: &[u8]) -> Vec<String> {
    let data = data.strip_suffix(b"\0").unwrap_or(data);
    if data.is_empty() {
        return Vec::new();
    }
    data.split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// A big-endian u32 at the start of `data`.
pub fn be_u32(data: &[u8]) -> Option<u32> {
    data.get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_round_trip() {
        let mut v = Vec::new();
        write_packet(&mut v, cmd::HELO, b"example.com\0").unwrap();
        assert_eq!(&v[..5], &[0, 0, 0, 13, b'H']);
        let (c, d) = read_packet(&mut &v[..]).unwrap();
        assert_eq!((c, d.as_slice()), (b'H', &b"example.com\0"[..]));
        assert_eq!(split_nul(b"a\0b\0"), vec!["a", "b"]);
    }
}
