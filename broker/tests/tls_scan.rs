//! A TLS scanner run against the real binary's mutual-TLS port (`serve --dev`): which protocol
//! versions, cipher suites, key exchange groups, compression, renegotiation, ALPN and client
//! certificate handling the broker accepts. Hand-made ClientHellos (one suite, one group, one
//! version at a time, so nothing a TLS library refuses to send is left out) and, as a second
//! opinion, `openssl s_client`. Prints the results as a Markdown table (`-- --nocapture`) and
//! asserts the policy: TLS 1.3 and 1.2 only, ECDHE with AEAD only, null compression only, no
//! renegotiation, no session resumption, no handshake without a client certificate from the
//! broker's CA.

#![allow(clippy::unwrap_used)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rustls::{
    AlertDescription, ClientConfig, ClientConnection, HandshakeKind, RootCertStore, StreamOwned,
    SupportedProtocolVersion,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use xpu_broker::{
    ca::{DevCa, IssueOptions, Pem},
    identity::Identity,
};

const BIN: &str = env!("CARGO_BIN_EXE_xpu-broker");
const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ---- the broker under test ----

struct Binary {
    child: Child,
    grpc: u16,
    dir: tempfile::TempDir,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn ready(http: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", http)) else { return false };
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = write!(s, "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

impl Binary {
    fn start() -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let (grpc, http) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("broker.log")).unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--dev", "--data-dir", dir.path().to_str().unwrap()])
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}"), "--http-addr", &format!("127.0.0.1:{http}")])
            .env_clear()
            .env("XPU_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let b = Binary { child, grpc, dir };
        let started = Instant::now();
        while !(ready(http) && TcpStream::connect(("127.0.0.1", grpc)).is_ok()) {
            assert!(started.elapsed() < Duration::from_secs(20), "not ready: {}", b.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    fn ca(&self) -> DevCa {
        DevCa::load(&self.dir.path().join("dev-ca")).unwrap()
    }

    /// A client certificate from the broker's CA, written as `<dir>/<name>/tls.{crt,key}`, `ca.crt`.
    fn issue(&self, identity: &str) -> (Pem, PathBuf) {
        let pem =
            self.ca().issue_client(&Identity::parse(identity).unwrap(), &IssueOptions::valid_for_days(1)).unwrap();
        let out = self.dir.path().join(identity.replace('/', "_"));
        xpu_broker::ca::write_issued(&out, &pem, &self.ca()).unwrap();
        (pem, out)
    }
}

// ---- hand-made ClientHellos ----

const X25519: u16 = 0x001d;
const SECP256R1: u16 = 0x0017;
const SECP384R1: u16 = 0x0018;
const EXT_SERVER_NAME: u16 = 0;
const EXT_HEARTBEAT: u16 = 15;
const EXT_ALPN: u16 = 16;
const EXT_EXTENDED_MASTER_SECRET: u16 = 23;
const EXT_SESSION_TICKET: u16 = 35;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const EXT_RENEGOTIATION_INFO: u16 = 0xff01;
const TLS_EMPTY_RENEGOTIATION_INFO_SCSV: u16 = 0x00ff;
const TLS_FALLBACK_SCSV: u16 = 0x5600;
/// ServerHello.random of a HelloRetryRequest (RFC 8446 §4.1.3).
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91, 0xc2, 0xa2, 0x11,
    0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];
/// The last 8 bytes of a TLS 1.2 ServerHello.random from a server that also speaks TLS 1.3.
const DOWNGRADE_SENTINEL: [u8; 8] = *b"DOWNGRD\x01";

/// Cipher suites probed in TLS 1.2 (and offered in the old-version probes): every family a
/// scanner flags, from NULL and EXPORT to the modern ECDHE AEAD suites.
const TLS12_SUITES: &[(u16, &str)] = &[
    (0x0000, "TLS_NULL_WITH_NULL_NULL"),
    (0x0001, "TLS_RSA_WITH_NULL_MD5"),
    (0x0002, "TLS_RSA_WITH_NULL_SHA"),
    (0x003b, "TLS_RSA_WITH_NULL_SHA256"),
    (0x0003, "TLS_RSA_EXPORT_WITH_RC4_40_MD5"),
    (0x0008, "TLS_RSA_EXPORT_WITH_DES40_CBC_SHA"),
    (0x0004, "TLS_RSA_WITH_RC4_128_MD5"),
    (0x0005, "TLS_RSA_WITH_RC4_128_SHA"),
    (0x0009, "TLS_RSA_WITH_DES_CBC_SHA"),
    (0x000a, "TLS_RSA_WITH_3DES_EDE_CBC_SHA"),
    (0x002f, "TLS_RSA_WITH_AES_128_CBC_SHA"),
    (0x0035, "TLS_RSA_WITH_AES_256_CBC_SHA"),
    (0x003c, "TLS_RSA_WITH_AES_128_CBC_SHA256"),
    (0x003d, "TLS_RSA_WITH_AES_256_CBC_SHA256"),
    (0x009c, "TLS_RSA_WITH_AES_128_GCM_SHA256"),
    (0x009d, "TLS_RSA_WITH_AES_256_GCM_SHA384"),
    (0x0016, "TLS_DHE_RSA_WITH_3DES_EDE_CBC_SHA"),
    (0x0033, "TLS_DHE_RSA_WITH_AES_128_CBC_SHA"),
    (0x0039, "TLS_DHE_RSA_WITH_AES_256_CBC_SHA"),
    (0x009e, "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256"),
    (0x009f, "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384"),
    (0xccaa, "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
    (0x0018, "TLS_DH_anon_WITH_RC4_128_MD5"),
    (0x0034, "TLS_DH_anon_WITH_AES_128_CBC_SHA"),
    (0x00a6, "TLS_DH_anon_WITH_AES_128_GCM_SHA256"),
    (0xc018, "TLS_ECDH_anon_WITH_AES_128_CBC_SHA"),
    (0x008c, "TLS_PSK_WITH_AES_128_CBC_SHA"),
    (0x00a8, "TLS_PSK_WITH_AES_128_GCM_SHA256"),
    (0xc004, "TLS_ECDH_ECDSA_WITH_AES_128_CBC_SHA"),
    (0xc02d, "TLS_ECDH_ECDSA_WITH_AES_128_GCM_SHA256"),
    (0xc006, "TLS_ECDHE_ECDSA_WITH_NULL_SHA"),
    (0xc007, "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA"),
    (0xc008, "TLS_ECDHE_ECDSA_WITH_3DES_EDE_CBC_SHA"),
    (0xc009, "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA"),
    (0xc00a, "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA"),
    (0xc023, "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256"),
    (0xc024, "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384"),
    (0xc02b, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
    (0xc02c, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
    (0xcca9, "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
    (0xc0ac, "TLS_ECDHE_ECDSA_WITH_AES_128_CCM"),
    (0xc0ae, "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8"),
    (0xc010, "TLS_ECDHE_RSA_WITH_NULL_SHA"),
    (0xc011, "TLS_ECDHE_RSA_WITH_RC4_128_SHA"),
    (0xc012, "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA"),
    (0xc013, "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"),
    (0xc014, "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"),
    (0xc027, "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256"),
    (0xc028, "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384"),
    (0xc02f, "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
    (0xc030, "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"),
    (0xcca8, "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
    (0x1301, "TLS_AES_128_GCM_SHA256 (a TLS 1.3 suite)"),
];

const TLS13_SUITES: &[(u16, &str)] = &[
    (0x1301, "TLS_AES_128_GCM_SHA256"),
    (0x1302, "TLS_AES_256_GCM_SHA384"),
    (0x1303, "TLS_CHACHA20_POLY1305_SHA256"),
    (0x1304, "TLS_AES_128_CCM_SHA256"),
    (0x1305, "TLS_AES_128_CCM_8_SHA256"),
];

const GROUPS: &[(u16, &str)] = &[
    (0x0001, "sect163k1"),
    (0x0013, "secp192r1"),
    (0x0015, "secp224r1"),
    (0x0016, "secp256k1"),
    (SECP256R1, "secp256r1"),
    (SECP384R1, "secp384r1"),
    (0x0019, "secp521r1"),
    (X25519, "x25519"),
    (0x001e, "x448"),
    (0x0100, "ffdhe2048"),
    (0x0101, "ffdhe3072"),
    (0x11ec, "X25519MLKEM768"),
];

/// The codes of the TLS 1.2 suites probed (without the TLS 1.3 one).
fn tls12_codes() -> Vec<u16> {
    TLS12_SUITES.iter().map(|(c, _)| *c).filter(|c| !(0x1301..=0x13ff).contains(c)).collect()
}

fn suite_name(code: u16) -> String {
    TLS12_SUITES
        .iter()
        .chain(TLS13_SUITES)
        .find(|(c, _)| *c == code)
        .map_or_else(|| format!("0x{code:04x}"), |(_, n)| n.split(' ').next().unwrap_or_default().to_string())
}

/// TLS 1.2 suites the policy allows: ephemeral ECDH key exchange and an AEAD cipher.
fn ecdhe_aead(name: &str) -> bool {
    name.starts_with("TLS_ECDHE_")
        && (name.contains("_GCM_") || name.contains("CHACHA20_POLY1305") || name.contains("_CCM"))
}

#[derive(Clone)]
struct Hello {
    record_version: u16,
    client_version: u16,
    suites: Vec<u16>,
    compression: Vec<u8>,
    /// supported_versions; empty leaves the extension out.
    versions: Vec<u16>,
    groups: Vec<u16>,
    key_shares: Vec<(u16, Vec<u8>)>,
    alpn: Vec<&'static str>,
    extra: Vec<(u16, Vec<u8>)>,
}

fn x25519_share() -> Vec<u8> {
    let rng = ring::rand::SystemRandom::new();
    let private = ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::X25519, &rng).unwrap();
    private.compute_public_key().unwrap().as_ref().to_vec()
}

fn u16b(v: usize) -> [u8; 2] {
    u16::try_from(v).unwrap().to_be_bytes()
}

/// `len(2) || body`
fn vec16(body: &[u8]) -> Vec<u8> {
    let mut v = u16b(body.len()).to_vec();
    v.extend_from_slice(body);
    v
}

fn vec8(body: &[u8]) -> Vec<u8> {
    let mut v = vec![u8::try_from(body.len()).unwrap()];
    v.extend_from_slice(body);
    v
}

fn list16(items: &[u16]) -> Vec<u8> {
    items.iter().flat_map(|i| i.to_be_bytes()).collect()
}

impl Hello {
    fn tls12(suites: &[u16]) -> Hello {
        Hello {
            record_version: 0x0301,
            client_version: 0x0303,
            suites: suites.to_vec(),
            compression: vec![0],
            versions: vec![],
            groups: vec![X25519, SECP256R1, SECP384R1],
            key_shares: vec![],
            alpn: vec![],
            extra: vec![],
        }
    }

    fn tls13(suites: &[u16]) -> Hello {
        Hello { versions: vec![0x0304], key_shares: vec![(X25519, x25519_share())], ..Hello::tls12(suites) }
    }

    /// A hello of an old version, offering every suite that version could negotiate.
    fn legacy(version: u16) -> Hello {
        let suites = tls12_codes();
        Hello { record_version: version.min(0x0301), client_version: version, ..Hello::tls12(&suites) }
    }

    fn with(mut self, ext: u16, body: &[u8]) -> Hello {
        self.extra.push((ext, body.to_vec()));
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut exts: Vec<(u16, Vec<u8>)> = Vec::new();
        let host = b"localhost";
        let mut sni = vec![0u8];
        sni.extend(vec16(host));
        exts.push((EXT_SERVER_NAME, vec16(&sni)));
        exts.push((10, vec16(&list16(&self.groups))));
        exts.push((11, vec8(&[0])));
        // ECDSA, RSA-PSS, RSA PKCS#1, Ed25519.
        let sig_algs = [0x0403, 0x0503, 0x0603, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501, 0x0601, 0x0807];
        exts.push((13, vec16(&list16(&sig_algs))));
        if !self.versions.is_empty() {
            exts.push((EXT_SUPPORTED_VERSIONS, vec8(&list16(&self.versions))));
            let shares: Vec<u8> =
                self.key_shares.iter().flat_map(|(g, k)| [g.to_be_bytes().to_vec(), vec16(k)].concat()).collect();
            exts.push((51, vec16(&shares)));
            exts.push((45, vec8(&[1])));
        }
        if !self.alpn.is_empty() {
            let protos: Vec<u8> = self.alpn.iter().flat_map(|p| vec8(p.as_bytes())).collect();
            exts.push((EXT_ALPN, vec16(&protos)));
        }
        exts.extend(self.extra.iter().cloned());
        let ext_bytes: Vec<u8> = exts.iter().flat_map(|(t, b)| [t.to_be_bytes().to_vec(), vec16(b)].concat()).collect();

        let mut body = self.client_version.to_be_bytes().to_vec();
        body.extend((0u8..32).map(|i| i.wrapping_mul(37)));
        body.extend(vec8(&[0x42; 32])); // legacy session id (TLS 1.3 middlebox compatibility)
        body.extend(vec16(&list16(&self.suites)));
        body.extend(vec8(&self.compression));
        body.extend(vec16(&ext_bytes));
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut handshake = vec![1, len[1], len[2], len[3]];
        handshake.extend(body);
        let mut record = vec![22];
        record.extend(self.record_version.to_be_bytes());
        record.extend(vec16(&handshake));
        record
    }
}

/// An SSL 2.0 CLIENT-HELLO (the 2-byte record header format).
fn sslv2_hello() -> Vec<u8> {
    let specs = [0x01, 0x00, 0x80, 0x07, 0x00, 0xc0, 0x03, 0x00, 0x80];
    let mut msg = vec![1, 0x00, 0x02];
    msg.extend(u16b(specs.len()));
    msg.extend([0, 0, 0, 16]);
    msg.extend(specs);
    msg.extend([0x5a; 16]);
    let mut record = vec![0x80 | u8::try_from(msg.len() >> 8).unwrap(), u8::try_from(msg.len() & 0xff).unwrap()];
    record.extend(msg);
    record
}

#[derive(Debug)]
struct ServerHello {
    legacy_version: u16,
    random: [u8; 32],
    suite: u16,
    compression: u8,
    extensions: Vec<(u16, Vec<u8>)>,
}

impl ServerHello {
    fn ext(&self, t: u16) -> Option<&[u8]> {
        self.extensions.iter().find(|(et, _)| *et == t).map(|(_, b)| b.as_slice())
    }

    fn version(&self) -> u16 {
        match self.ext(EXT_SUPPORTED_VERSIONS) {
            Some([a, b]) => u16::from_be_bytes([*a, *b]),
            _ => self.legacy_version,
        }
    }

    fn is_retry(&self) -> bool {
        self.random == HRR_RANDOM
    }

    fn alpn(&self) -> Option<String> {
        let b = self.ext(EXT_ALPN)?;
        Some(String::from_utf8_lossy(b.get(3..)?).into_owned())
    }
}

#[derive(Debug)]
enum Reply {
    Hello(ServerHello),
    Alert(u8, AlertDescription),
    Closed,
    Other(Vec<u8>),
}

fn version_name(v: u16) -> &'static str {
    match v {
        0x0300 => "SSL 3.0",
        0x0301 => "TLS 1.0",
        0x0302 => "TLS 1.1",
        0x0303 => "TLS 1.2",
        0x0304 => "TLS 1.3",
        _ => "?",
    }
}

impl Reply {
    fn accepted(&self) -> bool {
        matches!(self, Reply::Hello(_))
    }

    fn describe(&self) -> String {
        match self {
            Reply::Hello(h) if h.is_retry() => format!("HelloRetryRequest ({})", version_name(h.version())),
            Reply::Hello(h) => format!("ServerHello {} {}", version_name(h.version()), suite_name(h.suite)),
            Reply::Alert(level, d) => format!("{} alert {d:?}", if *level == 2 { "fatal" } else { "warning" }),
            Reply::Closed => "closed, no answer".into(),
            Reply::Other(b) => format!("unexpected bytes {:02x?}", &b[..b.len().min(16)]),
        }
    }
}

fn parse_server_hello(m: &[u8]) -> Option<ServerHello> {
    let legacy_version = u16::from_be_bytes([*m.first()?, *m.get(1)?]);
    let random: [u8; 32] = m.get(2..34)?.try_into().ok()?;
    let sid_len = usize::from(*m.get(34)?);
    let mut at = 35 + sid_len;
    let suite = u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]);
    let compression = *m.get(at + 2)?;
    at += 3;
    let mut extensions = Vec::new();
    if let Some(len) = m.get(at..at + 2) {
        let end = at + 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
        at += 2;
        while at + 4 <= end {
            let t = u16::from_be_bytes([m[at], m[at + 1]]);
            let l = usize::from(u16::from_be_bytes([m[at + 2], m[at + 3]]));
            extensions.push((t, m.get(at + 4..at + 4 + l)?.to_vec()));
            at += 4 + l;
        }
    }
    Some(ServerHello { legacy_version, random, suite, compression, extensions })
}

/// Sends `hello` on a fresh connection and reads the broker's first message.
fn send_hello(port: u16, hello: &[u8]) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(hello).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Walk the records read so far: an alert, or the first handshake message once complete.
        let mut handshake = Vec::new();
        let mut at = 0;
        while buf.len() >= at + 5 {
            let (ct, len) = (buf[at], usize::from(u16::from_be_bytes([buf[at + 3], buf[at + 4]])));
            if buf.len() < at + 5 + len {
                break;
            }
            let payload = &buf[at + 5..at + 5 + len];
            match ct {
                21 if payload.len() >= 2 => return Reply::Alert(payload[0], AlertDescription::from(payload[1])),
                22 => handshake.extend_from_slice(payload),
                // The TLS 1.3 middlebox-compatibility ChangeCipherSpec; then encrypted records.
                20 | 23 => {}
                _ => return Reply::Other(buf),
            }
            at += 5 + len;
            if handshake.len() >= 4 {
                let len = usize::from(handshake[1]) << 16 | usize::from(handshake[2]) << 8 | usize::from(handshake[3]);
                if handshake.len() >= 4 + len {
                    return match (handshake[0], parse_server_hello(&handshake[4..4 + len])) {
                        (2, Some(h)) => Reply::Hello(h),
                        _ => Reply::Other(buf),
                    };
                }
            }
        }
        if !buf.is_empty() && !matches!(buf[0], 21 | 22) {
            return Reply::Other(buf);
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) if buf.is_empty() => return Reply::Closed,
            Ok(0) | Err(_) => return Reply::Other(buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

// ---- full handshakes with rustls ----

fn rustls_client(ca_pem: &str, client: Option<&Pem>, version: &'static SupportedProtocolVersion) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some(p) => {
            let chain = CertificateDer::pem_slice_iter(p.cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(p.key.as_bytes()).unwrap()).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// A handshake, then `GET /api/v1/fleet`: the HTTP status line, or the alert that ended it; and
/// whether the handshake was a full one or resumed a session of the same `config`.
fn handshake(port: u16, config: &Arc<ClientConfig>) -> (Result<String, String>, Option<HandshakeKind>) {
    let conn = ClientConnection::new(Arc::clone(config), ServerName::try_from("localhost").unwrap()).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut tls = StreamOwned::new(conn, tcp);
    let alert = |e: &std::io::Error| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(a)) => format!("alert {a:?}"),
        _ => format!("error {e}"),
    };
    let _ = tls.write_all(b"GET /api/v1/fleet HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut out = Vec::new();
    let read = tls.read_to_end(&mut out);
    let kind = tls.conn.handshake_kind();
    if let Err(e) = read
        && out.is_empty()
    {
        return (Err(alert(&e)), kind);
    }
    let text = String::from_utf8_lossy(&out);
    let version = tls.conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
    (Ok(format!("{version}: {}", text.lines().next().unwrap_or_default())), kind)
}

fn full_handshake(port: u16, config: ClientConfig) -> Result<String, String> {
    handshake(port, &Arc::new(config)).0
}

// ---- openssl s_client ----

fn openssl_available() -> bool {
    Command::new("openssl").arg("version").output().is_ok_and(|o| o.status.success())
}

/// `openssl s_client` with the system configuration left out (it may raise the minimum version),
/// `input` on stdin; returns stdout and stderr together.
fn s_client(port: u16, args: &[&str], input: &[u8]) -> String {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "localhost"])
        .args(args)
        .env("OPENSSL_CONF", "/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn line_with<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines().map(str::trim).find(|l| l.starts_with(prefix)).unwrap_or("")
}

/// Client-initiated renegotiation on an established TLS 1.2 session (`R` in s_client):
/// returns (renegotiation ClientHello sent, a ServerHello came back, s_client output).
fn openssl_renegotiate(port: u16, cert_dir: &Path) -> (bool, bool, String) {
    let file = |f: &str| cert_dir.join(f).to_str().unwrap().to_string();
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "localhost", "-tls1_2", "-msg"])
        .args(["-cert", &file("tls.crt"), "-key", &file("tls.key"), "-CAfile", &file("ca.crt")])
        .env("OPENSSL_CONF", "/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(String::new()));
    let mut stdout = child.stdout.take().unwrap();
    let sink = Arc::clone(&out);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let wait_for = |needle: &str, within: Duration| {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if out.lock().unwrap().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    let mut stdin = child.stdin.take().unwrap();
    let established = wait_for("Verify return code: 0 (ok)", Duration::from_secs(5));
    if established {
        stdin.write_all(b"R\n").unwrap();
        stdin.flush().unwrap();
        // Long enough for a local server to answer a ClientHello many times over.
        std::thread::sleep(Duration::from_millis(1500));
    }
    let _ = child.kill();
    let _ = child.wait();
    drop(stdin);
    let _ = reader.join();
    let text = out.lock().unwrap().clone();
    // With -msg, s_client prints every handshake message: the second ClientHello is the
    // renegotiation; a second ServerHello would be the broker going along with it.
    let count = |msg: &str| {
        text.lines().filter(|l| l.starts_with(">>>") || l.starts_with("<<<")).filter(|l| l.ends_with(msg)).count()
    };
    let sent = established && count("], ClientHello") >= 2;
    let answered = count("], ServerHello") >= 2;
    (sent, answered, text)
}

// ---- the scan ----

struct Row {
    area: &'static str,
    probe: String,
    result: String,
    expected: &'static str,
    ok: bool,
}

#[derive(Default)]
struct Table(Vec<Row>);

impl Table {
    fn add(
        &mut self,
        area: &'static str,
        probe: impl Into<String>,
        result: impl Into<String>,
        expected: &'static str,
        ok: bool,
    ) {
        self.0.push(Row { area, probe: probe.into(), result: result.into(), expected, ok });
    }

    fn print(&self) {
        println!("\n| area | probe | result | policy | |\n|---|---|---|---|---|");
        for r in &self.0 {
            println!(
                "| {} | {} | {} | {} | {} |",
                r.area,
                r.probe,
                r.result,
                r.expected,
                if r.ok { "ok" } else { "**FAIL**" }
            );
        }
        println!();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Want {
    Accept,
    Refuse,
    /// Either is within the policy (e.g. an AEAD suite that needs an RSA certificate).
    Either,
}

impl Want {
    fn label(self) -> &'static str {
        match self {
            Want::Accept => "accepted",
            Want::Refuse => "refused",
            Want::Either => "either",
        }
    }

    fn check(self, accepted: bool) -> bool {
        match self {
            Want::Accept => accepted,
            Want::Refuse => !accepted,
            Want::Either => true,
        }
    }
}

#[test]
fn the_mtls_port_speaks_only_modern_tls() {
    assert!(
        openssl_available(),
        "this test needs `openssl` (the Debian package `openssl`) for its s_client cross-checks and renegotiation"
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let b = Binary::start();
    let port = b.grpc;
    let mut t = Table::default();

    // Protocol versions.
    let tls12 = tls12_codes();
    let tls13 = [0x1301, 0x1302, 0x1303];
    let r = send_hello(port, &sslv2_hello());
    t.add("version", "SSL 2.0 (v2 CLIENT-HELLO)", r.describe(), "refused", !r.accepted());
    for v in [0x0300, 0x0301, 0x0302] {
        let r = send_hello(port, &Hello::legacy(v).bytes());
        t.add("version", version_name(v), r.describe(), "refused", !r.accepted());
    }
    let r = send_hello(port, &Hello::tls12(&tls12).bytes());
    let ok = matches!(&r, Reply::Hello(h) if h.version() == 0x0303);
    t.add("version", "TLS 1.2", r.describe(), "accepted", ok);
    let r = send_hello(port, &Hello::tls13(&tls13).bytes());
    let ok = matches!(&r, Reply::Hello(h) if h.version() == 0x0304 && !h.is_retry());
    t.add("version", "TLS 1.3", r.describe(), "accepted", ok);
    // A TLS 1.3 client that also offers the old versions still gets TLS 1.3.
    let mut all = Hello::tls13(&[tls13.as_slice(), &tls12].concat());
    all.versions = vec![0x0304, 0x0303, 0x0302, 0x0301, 0x0300];
    let r = send_hello(port, &all.bytes());
    let ok = matches!(&r, Reply::Hello(h) if h.version() == 0x0304);
    t.add("version", "SSL 3.0 to TLS 1.3 offered", r.describe(), "TLS 1.3 chosen", ok);

    // TLS 1.2 cipher suites, one at a time.
    let mut accepted12 = Vec::new();
    for (code, name) in TLS12_SUITES {
        let want = if ["_GCM_SHA", "_CHACHA20_POLY1305_"].iter().any(|a| name.contains(a))
            && name.starts_with("TLS_ECDHE_ECDSA_")
        {
            // The broker's certificate has an ECDSA key.
            Want::Accept
        } else if ecdhe_aead(name) {
            Want::Either
        } else {
            Want::Refuse
        };
        let r = send_hello(port, &Hello::tls12(&[*code]).bytes());
        let accepted = matches!(&r, Reply::Hello(h) if h.suite == *code && h.version() == 0x0303);
        if accepted {
            accepted12.push(*name);
        }
        let result = if accepted { "accepted".to_string() } else { format!("refused ({})", r.describe()) };
        t.add("TLS 1.2 suite", format!("{name} (0x{code:04x})"), result, want.label(), want.check(accepted));
    }
    let policy = accepted12.iter().all(|n| ecdhe_aead(n)) && !accepted12.is_empty();
    t.add("TLS 1.2 suite", "all accepted suites", accepted12.join(", "), "ECDHE + AEAD only", policy);
    let r = send_hello(port, &Hello::tls12(&tls12).bytes());
    let ok = matches!(&r, Reply::Hello(h) if ecdhe_aead(&suite_name(h.suite)));
    t.add("TLS 1.2 suite", "server's choice among all", r.describe(), "ECDHE + AEAD", ok);

    // TLS 1.3 cipher suites (all AEAD by definition).
    for (code, name) in TLS13_SUITES {
        let want = if *code <= 0x1303 { Want::Accept } else { Want::Either };
        let r = send_hello(port, &Hello::tls13(&[*code]).bytes());
        let accepted = matches!(&r, Reply::Hello(h) if h.suite == *code && h.version() == 0x0304);
        let result = if accepted { "accepted".to_string() } else { format!("refused ({})", r.describe()) };
        t.add("TLS 1.3 suite", format!("{name} (0x{code:04x})"), result, want.label(), want.check(accepted));
    }

    // Key exchange groups: TLS 1.3 with no key share (a supported group gets a retry request),
    // and TLS 1.2 ECDHE.
    for (code, name) in GROUPS {
        let want = match *name {
            "x25519" | "secp256r1" | "secp384r1" => Want::Accept,
            "sect163k1" | "secp192r1" | "secp224r1" | "secp256k1" => Want::Refuse,
            _ => Want::Either,
        };
        let mut h13 = Hello::tls13(&tls13);
        h13.groups = vec![*code];
        h13.key_shares = vec![];
        let r = send_hello(port, &h13.bytes());
        let accepted = matches!(&r, Reply::Hello(h) if h.version() == 0x0304);
        t.add("group (TLS 1.3)", *name, r.describe(), want.label(), want.check(accepted));
        let mut h12 = Hello::tls12(&tls12);
        h12.groups = vec![*code];
        let r = send_hello(port, &h12.bytes());
        t.add("group (TLS 1.2)", *name, r.describe(), want.label(), want.check(r.accepted()));
    }

    // Compression.
    let mut deflate_first = Hello::tls12(&tls12);
    deflate_first.compression = vec![1, 0];
    let r = send_hello(port, &deflate_first.bytes());
    let ok = matches!(&r, Reply::Hello(h) if h.compression == 0);
    let result = match &r {
        Reply::Hello(h) => format!("method {} chosen", h.compression),
        other => other.describe(),
    };
    t.add("compression", "TLS 1.2, DEFLATE and null offered", result, "null chosen", ok);
    let mut deflate_only = Hello::tls12(&tls12);
    deflate_only.compression = vec![1];
    let r = send_hello(port, &deflate_only.bytes());
    t.add("compression", "TLS 1.2, DEFLATE only", r.describe(), "refused", !r.accepted());
    let mut deflate13 = Hello::tls13(&tls13);
    deflate13.compression = vec![1, 0];
    let r = send_hello(port, &deflate13.bytes());
    t.add("compression", "TLS 1.3, DEFLATE and null offered", r.describe(), "refused", !r.accepted());

    // Renegotiation.
    let r = send_hello(port, &Hello::tls12(&tls12).with(EXT_RENEGOTIATION_INFO, &[0]).bytes());
    let (ok, result) = match &r {
        Reply::Hello(h) => {
            let ri = h.ext(EXT_RENEGOTIATION_INFO);
            let shown = match ri {
                None => "no renegotiation_info".to_string(),
                Some([0]) => "empty renegotiation_info (RFC 5746 indication)".to_string(),
                Some(b) => format!("renegotiation_info {b:02x?}"),
            };
            (ri.is_none_or(|b| b == [0]), shown)
        }
        other => (false, other.describe()),
    };
    t.add("renegotiation", "TLS 1.2 initial hello, renegotiation_info", result, "empty or absent (RFC 5746)", ok);
    let r = send_hello(port, &Hello::tls12(&[tls12.as_slice(), &[TLS_EMPTY_RENEGOTIATION_INFO_SCSV]].concat()).bytes());
    t.add(
        "renegotiation",
        "TLS 1.2 initial hello, EMPTY_RENEGOTIATION_INFO_SCSV",
        r.describe(),
        "accepted",
        r.accepted(),
    );
    // An initial hello claiming a previous session's verify_data: RFC 5746 §3.6 says abort; rustls
    // does not check, which matters only to a server that renegotiates (this one never does).
    let r = send_hello(port, &Hello::tls12(&tls12).with(EXT_RENEGOTIATION_INFO, &[12; 13]).bytes());
    t.add(
        "renegotiation",
        "TLS 1.2 initial hello, non-empty renegotiation_info",
        r.describe(),
        "either (RFC 5746 says refuse; moot without renegotiation)",
        true,
    );
    let (_, admin_dir) = b.issue("admin/scan");
    let (sent, answered, output) = openssl_renegotiate(port, &admin_dir);
    let logged = b.log().contains("Sending warning alert NoRenegotiation");
    let result =
        format!("ClientHello sent: {sent}, ServerHello back: {answered}, broker logged no_renegotiation: {logged}");
    t.add(
        "renegotiation",
        "client-initiated, after a TLS 1.2 handshake (openssl R)",
        result,
        "refused",
        sent && !answered && logged,
    );

    // Other extensions and downgrade protection.
    let r = send_hello(port, &Hello::tls12(&tls12).bytes());
    let ok = matches!(&r, Reply::Hello(h) if h.random[24..] == DOWNGRADE_SENTINEL);
    t.add(
        "downgrade",
        "TLS 1.2 ServerHello.random ends in DOWNGRD\\x01",
        if ok { "yes" } else { "no" },
        "yes (RFC 8446 §4.1.3)",
        ok,
    );
    let r = send_hello(port, &Hello::tls12(&[tls12.as_slice(), &[TLS_FALLBACK_SCSV]].concat()).bytes());
    t.add("downgrade", "TLS 1.2 hello with TLS_FALLBACK_SCSV", r.describe(), "either (sentinel protects)", true);
    let r = send_hello(port, &Hello::tls12(&tls12).with(EXT_HEARTBEAT, &[1]).bytes());
    let ok = matches!(&r, Reply::Hello(h) if h.ext(EXT_HEARTBEAT).is_none());
    t.add(
        "extension",
        "heartbeat offered",
        if ok { "not negotiated".into() } else { r.describe() },
        "not negotiated",
        ok,
    );
    let r = send_hello(port, &Hello::tls12(&tls12).with(EXT_EXTENDED_MASTER_SECRET, &[]).bytes());
    let ok = matches!(&r, Reply::Hello(h) if h.ext(EXT_EXTENDED_MASTER_SECRET).is_some());
    t.add("extension", "extended master secret offered", if ok { "echoed".into() } else { r.describe() }, "echoed", ok);
    let r = send_hello(port, &Hello::tls12(&tls12).with(EXT_SESSION_TICKET, &[]).bytes());
    let tickets = matches!(&r, Reply::Hello(h) if h.ext(EXT_SESSION_TICKET).is_some());
    t.add(
        "extension",
        "TLS 1.2 session ticket offered",
        if tickets { "tickets issued" } else { "no tickets" },
        "either",
        r.accepted(),
    );
    for (alpn, want) in [(vec!["h2"], Some("h2")), (vec!["http/1.1"], Some("http/1.1")), (vec!["h2c", "spdy/3"], None)]
    {
        let mut h = Hello::tls12(&tls12);
        h.alpn = alpn.clone();
        let r = send_hello(port, &h.bytes());
        let (ok, result) = match (&r, want) {
            (Reply::Hello(h), Some(w)) => {
                (h.alpn().as_deref() == Some(w), format!("ALPN {}", h.alpn().unwrap_or_else(|| "none".into())))
            }
            (other, None) => (!other.accepted(), other.describe()),
            (other, Some(_)) => (false, other.describe()),
        };
        let expected = if want.is_some() { "selected" } else { "refused" };
        t.add("ALPN", format!("offered {alpn:?}"), result, expected, ok);
    }

    // Client certificates, full handshakes.
    let ca = b.ca().pem.cert;
    let (admin, _) = b.issue("admin/scan");
    let rogue = DevCa::generate("rogue").unwrap();
    let foreign = rogue.issue_client(&Identity::Admin("scan".into()), &IssueOptions::valid_for_days(1)).unwrap();
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let v = format!("{:?}", version.version);
        let r = full_handshake(port, rustls_client(&ca, None, version));
        let ok = r.as_ref().is_err_and(|e| e.starts_with("alert "));
        t.add("client cert", format!("{v}, none"), r.unwrap_or_else(|e| e), "handshake refused", ok);
        let r = full_handshake(port, rustls_client(&ca, Some(&foreign), version));
        let ok = r.as_ref().is_err_and(|e| e == "alert UnknownCA");
        t.add("client cert", format!("{v}, from another CA"), r.unwrap_or_else(|e| e), "handshake refused", ok);
        let r = full_handshake(port, rustls_client(&ca, Some(&admin), version));
        let ok = r.as_ref().is_ok_and(|s| s.ends_with("HTTP/1.1 200 OK"));
        t.add("client cert", format!("{v}, admin from the broker's CA"), r.unwrap_or_else(|e| e), "accepted", ok);
        // Resumption would skip the client-certificate checks (an expired certificate would get in).
        let config = Arc::new(rustls_client(&ca, Some(&admin), version));
        let first = handshake(port, &config);
        let second = handshake(port, &config);
        let ok = [&first, &second].iter().all(|(r, k)| r.is_ok() && *k == Some(HandshakeKind::Full));
        let result =
            format!("reconnect with the same client: {} handshake", second.1.map_or("no".into(), |k| format!("{k:?}")));
        t.add("resumption", format!("{v}, admin reconnects"), result, "full handshake (none resumed)", ok);
    }

    // The same through openssl.
    let file = |f: &str| admin_dir.join(f).to_str().unwrap().to_string();
    let auth = ["-cert".to_string(), file("tls.crt"), "-key".into(), file("tls.key"), "-CAfile".into(), file("ca.crt")];
    let auth: Vec<&str> = auth.iter().map(String::as_str).collect();
    let get = b"GET /api/v1/fleet HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    for (flag, protocol) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        let out = s_client(port, &[&[flag, "-ign_eof"], auth.as_slice()].concat(), get);
        // "New, TLSv1.3, Cipher is TLS_AES_256_GCM_SHA384"
        let new = line_with(&out, "New, ");
        let ok = new.starts_with(&format!("New, {protocol}, Cipher is "))
            && out.contains("Verify return code: 0 (ok)")
            && out.contains("HTTP/1.1 200 OK")
            && out.contains("Compression: NONE");
        let result = format!("{new}, {}", line_with(&out, "Compression:"));
        t.add("openssl", format!("s_client {flag} with the admin cert"), result, "accepted", ok);
    }
    for (flag, cipher) in [
        ("-tls1", "ALL:@SECLEVEL=0"),
        ("-tls1_1", "ALL:@SECLEVEL=0"),
        ("-tls1_2", "ALL:!ECDHE:@SECLEVEL=0"),
        ("-tls1_2", "ECDHE:!AESGCM:!CHACHA20:@SECLEVEL=0"),
    ] {
        let out = s_client(port, &[&[flag, "-cipher", cipher, "-msg"], auth.as_slice()].concat(), b"");
        let sent = out.contains("ClientHello");
        let refused = out.contains("Cipher is (NONE)") && !out.contains("ServerHello");
        let result = format!("ClientHello sent: {sent}; {}", line_with(&out, "New, "));
        t.add("openssl", format!("s_client {flag} -cipher '{cipher}'"), result, "refused", sent && refused);
    }

    t.print();
    let failed: Vec<String> =
        t.0.iter().filter(|r| !r.ok).map(|r| format!("{}: {} -> {}", r.area, r.probe, r.result)).collect();
    assert!(
        failed.is_empty(),
        "TLS policy violations:\n{}\n\nlast openssl renegotiation output:\n{output}",
        failed.join("\n")
    );
    assert!(b.log().contains("TLS handshake refused"), "the broker logs refused handshakes");
}
