//! `turn-control drain`: asks a running daemon's admin server to drain (POST /drain) and,
//! with `--wait`, polls GET /drain until the daemon is gone or holds no allocation. Blocking
//! I/O: it runs alone, before any runtime.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context as _;

use crate::config::DrainArgs;

/// How long one connection attempt or answer may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How often `--wait` asks.
const POLL: Duration = Duration::from_millis(500);

/// Runs the subcommand. An error means the daemon could not be reached (or refused).
pub fn run(args: &DrainArgs) -> anyhow::Result<()> {
    let admin = args.admin;
    let (code, body) = request(admin, "POST")
        .with_context(|| format!("cannot reach the daemon's admin server at {admin}"))?;
    if code != 202 {
        anyhow::bail!("POST http://{admin}/drain answered {code}: {}", body.trim());
    }
    println!(
        "draining: {} allocation(s) left",
        allocations(&body).unwrap_or(0)
    );
    if !args.wait {
        return Ok(());
    }
    loop {
        std::thread::sleep(POLL);
        let stream = match connect(admin) {
            Ok(stream) => stream,
            Err(_) => {
                println!("the daemon has exited");
                return Ok(());
            }
        };
        // A daemon that goes away mid-answer has exited too; a slow one is asked again.
        match exchange(stream, "GET", admin) {
            Ok((200, body)) if allocations(&body) == Some(0) => {
                println!("no allocation left");
                return Ok(());
            }
            Ok(_) => {}
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                println!("the daemon has exited");
                return Ok(());
            }
            Err(_) => {}
        }
    }
}

fn connect(admin: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&admin, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

fn request(admin: SocketAddr, method: &str) -> std::io::Result<(u16, String)> {
    exchange(connect(admin)?, method, admin)
}

/// `method /drain` over `stream`: the status code and the body.
fn exchange(
    mut stream: TcpStream,
    method: &str,
    admin: SocketAddr,
) -> std::io::Result<(u16, String)> {
    write!(
        stream,
        "{method} /drain HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or(std::io::ErrorKind::UnexpectedEof)?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or(std::io::ErrorKind::InvalidData)?;
    Ok((code, body.to_owned()))
}

/// `N` of `{"draining":..,"allocations":N}`.
fn allocations(body: &str) -> Option<u32> {
    let (_, rest) = body.split_once("\"allocations\":")?;
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_read_from_the_json() {
        assert_eq!(
            allocations(r#"{"draining":true,"allocations":12}"#),
            Some(12)
        );
        assert_eq!(
            allocations(r#"{"draining":true,"allocations": 0}"#),
            Some(0)
        );
        assert_eq!(allocations("nonsense"), None);
    }
}
