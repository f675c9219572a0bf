//! A fake NBD server on a unix socket: a correct handshake (structured replies,
//! `base:allocation`), then answers that break the protocol in one chosen way, to show that
//! holdfast refuses them and commits nothing.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// How the server misbehaves once transmission starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Answers correctly (a data pattern, every block allocated).
    None,
    /// Closes the connection in the middle of a read's data.
    DropMidRead,
    /// Answers a read with a cookie nobody asked about.
    WrongHandle,
    /// Sends a data chunk far longer than the read asked for.
    OversizedReply,
    /// Describes an extent that runs past the end of the export.
    ExtentPastEnd,
    /// Answers a read with data at an offset near 2^64, where offset + length wraps round.
    WrappingOffset,
    /// Ends a read without sending all of its data.
    ShortRead,
}

pub struct FakeNbd {
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeNbd {
    /// Serves an export named `disk` of `size` bytes.
    pub fn start(size: u64, mode: Misbehaviour) -> FakeNbd {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                std::thread::spawn(move || {
                    let _ = serve(conn, size, mode);
                });
            }
        });
        FakeNbd { socket, _dir: dir }
    }

    pub fn uri(&self) -> String {
        uri_for(&self.socket, "disk")
    }
}

pub fn uri_for(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// The byte the fake export holds at `offset`.
pub fn byte_at(offset: u64) -> u8 {
    (offset / 4096 % 251) as u8 + 1
}

fn u16(r: &mut impl Read) -> std::io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn opt_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::new();
    b.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0x668e_33efu32.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

fn serve(mut s: UnixStream, size: u64, mode: Misbehaviour) -> std::io::Result<()> {
    s.write_all(b"NBDMAGIC")?;
    s.write_all(&0x4948_4156_454f_5054u64.to_be_bytes())?;
    s.write_all(&3u16.to_be_bytes())?; // fixed newstyle, no zeroes
    let _client_flags = u32(&mut s)?;
    let mut meta = false;
    loop {
        let _magic = u64(&mut s)?;
        let opt = u32(&mut s)?;
        let len = u32(&mut s)?;
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            8 => opt_reply(&mut s, opt, 1, &[])?,
            10 => {
                let text = String::from_utf8_lossy(&data);
                if text.contains("base:allocation") {
                    let mut d = 1u32.to_be_bytes().to_vec();
                    d.extend_from_slice(b"base:allocation");
                    opt_reply(&mut s, opt, 4, &d)?;
                    meta = true;
                }
                opt_reply(&mut s, opt, 1, &[])?;
            }
            7 => {
                let nlen = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                if &data[4..4 + nlen] != b"disk" {
                    opt_reply(&mut s, opt, (1 << 31) | 6, b"no such export")?;
                    continue;
                }
                let mut d = 0u16.to_be_bytes().to_vec();
                d.extend_from_slice(&size.to_be_bytes());
                d.extend_from_slice(&(1u16 | 1 << 1 | 1 << 3).to_be_bytes());
                opt_reply(&mut s, opt, 3, &d)?;
                opt_reply(&mut s, opt, 1, &[])?;
                break;
            }
            _ => opt_reply(&mut s, opt, (1 << 31) | 1, &[])?,
        }
    }
    loop {
        let _magic = u32(&mut s)?;
        let _flags = u16(&mut s)?;
        let cmd = u16(&mut s)?;
        let cookie = u64(&mut s)?;
        let offset = u64(&mut s)?;
        let len = u32(&mut s)?;
        match cmd {
            0 => {
                let mut payload = offset.to_be_bytes().to_vec();
                let data: Vec<u8> = (0..len as u64).map(|i| byte_at(offset + i)).collect();
                match mode {
                    Misbehaviour::DropMidRead => {
                        payload.extend_from_slice(&data[..data.len() / 2]);
                        let mut c = chunk(1, 1, cookie, &payload);
                        c.truncate(c.len() - data.len() / 4);
                        s.write_all(&c)?;
                        return Ok(());
                    }
                    Misbehaviour::WrongHandle => {
                        payload.extend_from_slice(&data);
                        s.write_all(&chunk(1, 1, cookie + 1000, &payload))?;
                    }
                    Misbehaviour::OversizedReply => {
                        payload.extend_from_slice(&data);
                        payload.resize(payload.len() + (64 << 20), 7);
                        s.write_all(&chunk(1, 1, cookie, &payload))?;
                    }
                    Misbehaviour::WrappingOffset => {
                        let mut payload = (u64::MAX - 8).to_be_bytes().to_vec();
                        payload.extend_from_slice(&data);
                        s.write_all(&chunk(1, 1, cookie, &payload))?;
                    }
                    Misbehaviour::ShortRead => {
                        payload.extend_from_slice(&data[..data.len() - 512]);
                        s.write_all(&chunk(1, 1, cookie, &payload))?;
                    }
                    _ => {
                        payload.extend_from_slice(&data);
                        s.write_all(&chunk(1, 1, cookie, &payload))?;
                    }
                }
            }
            2 => return Ok(()),
            7 if meta => {
                let mut payload = 1u32.to_be_bytes().to_vec();
                let ext = if mode == Misbehaviour::ExtentPastEnd {
                    (size - offset + (1 << 20)).min(u32::MAX as u64) as u32
                } else {
                    len
                };
                payload.extend_from_slice(&ext.to_be_bytes());
                payload.extend_from_slice(&0u32.to_be_bytes());
                s.write_all(&chunk(1, 5, cookie, &payload))?;
            }
            _ => {
                // A simple error reply: EINVAL.
                let mut b = 0x6744_6698u32.to_be_bytes().to_vec();
                b.extend_from_slice(&22u32.to_be_bytes());
                b.extend_from_slice(&cookie.to_be_bytes());
                s.write_all(&b)?;
            }
        }
    }
}
