//! A minimal HTTP/1.1 client for tests: one request per connection, raw bytes, so tests can
//! also open a request and walk away (a client that disconnects while waiting).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub elapsed: Duration,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A request being built: `Request::get(addr, "a.test").header("x-id", "1").send()`.
#[derive(Debug, Clone)]
pub struct Request {
    addr: SocketAddr,
    method: String,
    host: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout: Duration,
}

impl Request {
    pub fn get(addr: SocketAddr, host: &str) -> Request {
        Request {
            addr,
            method: "GET".into(),
            host: host.into(),
            path: "/".into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }

    pub fn post(addr: SocketAddr, host: &str, path: &str, body: Vec<u8>) -> Request {
        Request {
            method: "POST".into(),
            path: path.into(),
            body,
            ..Request::get(addr, host)
        }
    }

    pub fn path(mut self, path: &str) -> Request {
        self.path = path.into();
        self
    }

    pub fn header(mut self, k: &str, v: impl ToString) -> Request {
        self.headers.push((k.into(), v.to_string()));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Request {
        self.timeout = t;
        self
    }

    /// Connects and writes the request; the answer is read by [`Pending::wait`]. Dropping the
    /// `Pending` closes the connection (the client goes away).
    pub fn start(&self) -> std::io::Result<Pending> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(self.timeout))?;
        let mut head = format!(
            "{} {} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\ncontent-length: {}\r\n",
            self.method,
            self.path,
            self.host,
            self.body.len()
        );
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        stream.write_all(&bytes)?;
        Ok(Pending {
            stream,
            started: Instant::now(),
        })
    }

    pub fn send(&self) -> std::io::Result<Response> {
        self.start()?.wait()
    }
}

/// A request on the wire.
pub struct Pending {
    stream: TcpStream,
    started: Instant,
}

impl Pending {
    pub fn wait(self) -> std::io::Result<Response> {
        let started = self.started;
        let mut reader = BufReader::new(self.stream);
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed without a response",
            ));
        }
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        let mut length: Option<usize> = None;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                if k == "content-length" {
                    length = v.parse().ok();
                }
                headers.push((k, v));
            }
        }
        let mut body = Vec::new();
        match length {
            Some(n) => {
                body.resize(n, 0);
                reader.read_exact(&mut body)?;
            }
            None => {
                reader.read_to_end(&mut body)?;
            }
        }
        Ok(Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            elapsed: started.elapsed(),
        })
    }
}
