//! The TCP rendezvous at `MASTER_ADDR:MASTER_PORT`: rank 0 listens, every other rank connects
//! and says who it is and how large it thinks the world is; once all have arrived, rank 0 sends
//! each its bytes (NCCL's unique id, or nothing). A rank that does not arrive in time, a world
//! size that differs, a rank twice, a port in use: each is an error that names it, on every rank
//! that can be told.
//!
//! Messages: a hello is `DIDR`, a version byte, then the rank and the world size (u32 LE each);
//! rank 0 answers with a status byte (0 ok, 1 error), a length (u32 LE) and the payload or the
//! error's text. The connections stay open for [`super::TcpCollective`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::Placement;
use crate::Error;

const MAGIC: &[u8; 4] = b"DIDR";
const VERSION: u8 = 1;

/// The ranks, met: rank 0 holds a connection to every other rank (index = rank, `None` at 0);
/// every other rank one to rank 0. `payload` is what rank 0 handed out.
#[derive(Debug)]
pub struct Session {
    /// Where this process sits.
    pub place: Placement,
    /// The connections, by rank.
    pub peers: Vec<Option<TcpStream>>,
    /// Rank 0's bytes, the same on every rank.
    pub payload: Vec<u8>,
}

/// Meets the other ranks of `place`'s launch within `timeout`. Rank 0 hands `payload` (say,
/// NCCL's unique id) to every rank; the other ranks' `payload` is ignored.
pub fn rendezvous(place: &Placement, payload: &[u8], timeout: Duration) -> Result<Session, Error> {
    let deadline = Instant::now() + timeout;
    if place.world == 1 {
        return Ok(Session {
            place: place.clone(),
            peers: vec![None],
            payload: payload.to_vec(),
        });
    }
    let addr = resolve(place)?;
    if place.rank == 0 {
        lead(place, addr, payload, deadline, timeout)
    } else {
        join(place, addr, deadline, timeout)
    }
}

fn fail(m: String) -> Error {
    Error::Launch(m)
}

fn resolve(place: &Placement) -> Result<SocketAddr, Error> {
    (place.master_addr.as_str(), place.master_port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            fail(format!(
                "MASTER_ADDR {:?} does not resolve to an address; set it to rank 0's host name or IP",
                place.master_addr
            ))
        })
}

/// Rank 0: listens, checks every hello, answers every rank.
fn lead(
    place: &Placement,
    addr: SocketAddr,
    payload: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<Session, Error> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        fail(match e.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "rank 0 cannot listen on {addr}: the port is in use (another run, or a process that has not exited); set MASTER_PORT to a free port"
            ),
            _ => format!("rank 0 cannot listen on {addr}: {e}; set MASTER_ADDR to this node's address and MASTER_PORT to a free port"),
        })
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(format!("cannot poll {addr}: {e}")))?;
    let mut peers: Vec<Option<TcpStream>> = (0..place.world).map(|_| None).collect();
    let mut problem: Option<String> = None;
    while problem.is_none() && peers.iter().skip(1).any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let missing: Vec<usize> = (1..place.world).filter(|&r| peers[r].is_none()).collect();
            problem = Some(format!(
                "rank(s) {missing:?} did not arrive at {addr} within {:.0} s; start every rank, with the same MASTER_ADDR and MASTER_PORT",
                timeout.as_secs_f64()
            ));
            break;
        }
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(fail(format!("rank 0 cannot accept on {addr}: {e}"))),
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(100))));
        let Ok((rank, world)) = read_hello(&mut stream) else {
            continue; // not a rank of ours: a port scanner, a stale process
        };
        let complaint = if world != place.world {
            Some(format!(
                "rank {rank} was launched with a world of {world}, rank 0 with {}; give every rank the same WORLD_SIZE",
                place.world
            ))
        } else if rank == 0 || rank >= place.world {
            Some(format!(
                "a process says it is rank {rank} of {world}; ranks 1..{} may join rank 0",
                place.world
            ))
        } else if peers[rank].is_some() {
            Some(format!(
                "two processes say they are rank {rank}; give each process its own RANK"
            ))
        } else {
            None
        };
        match complaint {
            Some(c) => {
                let _ = answer(&mut stream, 1, c.as_bytes());
                problem = Some(c);
            }
            None => peers[rank] = Some(stream),
        }
    }
    if let Some(p) = problem {
        for s in peers.iter_mut().flatten() {
            let _ = answer(s, 1, p.as_bytes());
        }
        return Err(fail(p));
    }
    for s in peers.iter_mut().flatten() {
        answer(s, 0, payload)
            .map_err(|e| fail(format!("a rank left during the rendezvous: {e}")))?;
        let _ = s.set_read_timeout(None);
    }
    Ok(Session {
        place: place.clone(),
        peers,
        payload: payload.to_vec(),
    })
}

/// Another rank: connects (retrying until rank 0 listens), says hello, waits for the answer.
fn join(
    place: &Placement,
    addr: SocketAddr,
    deadline: Instant,
    timeout: Duration,
) -> Result<Session, Error> {
    let mut stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(fail(format!(
                    "rank {}: rank 0 at {addr} could not be reached within {:.0} s ({e}); start rank 0, and check MASTER_ADDR and MASTER_PORT",
                    place.rank,
                    timeout.as_secs_f64()
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut hello = Vec::with_capacity(HELLO_BYTES);
    hello.extend_from_slice(MAGIC);
    hello.push(VERSION);
    hello.extend_from_slice(&(place.rank as u32).to_le_bytes());
    hello.extend_from_slice(&(place.world as u32).to_le_bytes());
    let lost = |e: std::io::Error| {
        fail(format!(
            "rank {}: the rendezvous with rank 0 at {addr} broke: {e}",
            place.rank
        ))
    };
    stream.write_all(&hello).map_err(lost)?;
    // Rank 0 answers once every rank has arrived, or when it gives up (its own timeout).
    let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
    stream.set_read_timeout(Some(wait)).map_err(lost)?;
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).map_err(|e| {
        fail(format!(
            "rank {}: rank 0 at {addr} did not confirm the rendezvous ({e}); its own error says which rank is missing",
            place.rank
        ))
    })?;
    let (ok, len) = parse_answer_head(&head)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).map_err(lost)?;
    if !ok {
        return Err(fail(String::from_utf8_lossy(&body).into_owned()));
    }
    stream.set_read_timeout(None).map_err(lost)?;
    let mut peers: Vec<Option<TcpStream>> = (0..place.world).map(|_| None).collect();
    peers[0] = Some(stream);
    Ok(Session {
        place: place.clone(),
        peers,
        payload: body,
    })
}

fn read_hello(stream: &mut TcpStream) -> std::io::Result<(usize, usize)> {
    let mut b = [0u8; HELLO_BYTES];
    stream.read_exact(&mut b)?;
    parse_hello(&b).ok_or_else(|| std::io::Error::other("not a did rank"))
}

/// Bytes in a hello.
pub const HELLO_BYTES: usize = 13;
/// The longest answer rank 0 sends (a unique id is 128 bytes, an error a sentence).
pub const MAX_ANSWER_BYTES: usize = 1 << 16;

/// A hello's rank and world size, or `None` when the bytes are not a did rank's hello.
///
/// ```
/// use did_engine::launch::rendezvous::parse_hello;
/// let mut hello = b"DIDR\x01".to_vec();
/// hello.extend(3u32.to_le_bytes());
/// hello.extend(8u32.to_le_bytes());
/// assert_eq!(parse_hello(&hello), Some((3, 8)));
/// assert_eq!(parse_hello(b"GET / HTTP/1.1"), None);
/// ```
pub fn parse_hello(b: &[u8]) -> Option<(usize, usize)> {
    if b.len() != HELLO_BYTES || &b[..4] != MAGIC || b[4] != VERSION {
        return None;
    }
    let rank = u32::from_le_bytes([b[5], b[6], b[7], b[8]]) as usize;
    let world = u32::from_le_bytes([b[9], b[10], b[11], b[12]]) as usize;
    Some((rank, world))
}

/// An answer's status (`true`: ok) and body length, from its first five bytes; a length past
/// [`MAX_ANSWER_BYTES`] is not rank 0's.
pub fn parse_answer_head(head: &[u8; 5]) -> Result<(bool, usize), Error> {
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if head[0] > 1 || len > MAX_ANSWER_BYTES {
        return Err(fail(format!(
            "the rendezvous answer is not rank 0's (status {}, {len} bytes): another program holds MASTER_PORT, or the ranks run different versions of did",
            head[0]
        )));
    }
    Ok((head[0] == 0, len))
}

fn answer(stream: &mut TcpStream, status: u8, body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(5 + body.len());
    msg.push(status);
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    stream.write_all(&msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(rank: usize, world: usize, port: u16) -> Placement {
        Placement {
            rank,
            world,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Runs ranks `ranks` of a world (each with its own claimed world size) on threads.
    fn meet(port: u16, ranks: &[(usize, usize)], timeout: Duration) -> Vec<Result<Session, Error>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|&(rank, world)| {
                    s.spawn(move || rendezvous(&place(rank, world, port), b"unique id", timeout))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn every_rank_gets_rank_zeros_bytes() {
        let sessions = meet(
            free_port(),
            &[(2, 3), (0, 3), (1, 3)],
            Duration::from_secs(10),
        );
        for s in sessions {
            let s = s.unwrap();
            assert_eq!(s.payload, b"unique id");
            assert_eq!(
                s.peers.iter().flatten().count(),
                if s.place.rank == 0 { 2 } else { 1 }
            );
        }
    }

    #[test]
    fn a_missing_rank_is_named_within_the_timeout() {
        let started = Instant::now();
        let results = meet(free_port(), &[(0, 3), (1, 3)], Duration::from_millis(500));
        assert!(started.elapsed() < Duration::from_secs(8));
        for r in results {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("rank(s) [2] did not arrive"), "{e}");
        }
    }

    #[test]
    fn a_rank_launched_with_another_world_size_stops_the_launch() {
        let results = meet(free_port(), &[(0, 2), (1, 3)], Duration::from_secs(10));
        for r in results {
            let e = r.unwrap_err().to_string();
            assert!(
                e.contains("rank 1 was launched with a world of 3, rank 0 with 2"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_port_in_use_is_named_with_the_fix() {
        let holder = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        let e = rendezvous(&place(0, 2, port), b"", Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the port is in use") && e.contains("MASTER_PORT"),
            "{e}"
        );
    }

    #[test]
    fn a_rank_without_rank_zero_says_so() {
        let port = free_port();
        let e = rendezvous(&place(1, 2, port), b"", Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 0 at 127.0.0.1") && e.contains("could not be reached"),
            "{e}"
        );
    }
}
