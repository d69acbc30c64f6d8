//! `sd21 serve` end to end: each test starts the real binary on 127.0.0.1 (a free port) with
//! the tiny fixture model and talks to it as a client would, through ureq (and a raw socket where
//! a test must control the bytes: no Accept header, an oversized body, a hang-up mid-request). One test runs the library's
//! `serve` in-process with a stand-in model that fails on demand.
//!
//! Slow jobs are made with many steps at 256×256 (tens of seconds on the CPU), never sleeps;
//! waiting is "poll until true, with a generous bound", never a timing assertion.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use common::{decode_png, tiny_model};

// ---------------------------------------------------------------------------------------------
// The client: ureq, and a raw socket only where a test must control the bytes on the wire (no
// Accept header at all, a body the server refuses before reading it, a client that hangs up).

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request through ureq; 4xx and 5xx answers are replies like any other.
fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let agent = ureq::AgentBuilder::new()
        .timeout_read(Duration::from_secs(600))
        .build();
    let mut request = agent.request(method, &format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.set(name, value);
    }
    let result = match body {
        Some(body) => request.send_bytes(body),
        None => request.call(),
    };
    let response = match result {
        Ok(response) | Err(ureq::Error::Status(_, response)) => response,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .filter_map(|name| {
            let value = response.header(&name)?.to_string();
            Some((name, value))
        })
        .collect();
    let mut body = Vec::new();
    response
        .into_reader()
        .read_to_end(&mut body)
        .expect("read the answer");
    Reply {
        status,
        headers,
        body,
    }
}

fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(addr, "GET", path, headers, None)
}

/// POST JSON to /generate/ with the given Accept (None: ureq's `*/*`).
fn generate(addr: SocketAddr, accept: Option<&str>, body: &Value) -> Reply {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(accept) = accept {
        headers.push(("Accept", accept));
    }
    post(addr, &headers, body.to_string().as_bytes())
}

fn post(addr: SocketAddr, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    send(addr, "POST", "/generate/", headers, Some(body))
}

/// A whole request as bytes: `head` (request line and headers, without the blank line), then
/// `body`. Answers are read by [`exchange_raw`].
fn raw_request(head: &str, body: &[u8]) -> Vec<u8> {
    let mut raw = format!("{head}\r\n\r\n").into_bytes();
    raw.extend_from_slice(body);
    raw
}

/// Sends raw bytes and reads the answer until the server closes (the head parsed by httparse,
/// the body by its Content-Length).
fn exchange_raw(addr: SocketAddr, raw: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(600)))
        .expect("timeout");
    // The server may answer (413) and close before reading a large body: ignore write errors.
    let _ = stream.write_all(raw);
    let mut bytes = Vec::new();
    // A reset after the answer (unread body) still leaves the answer in `bytes`.
    let _ = stream.read_to_end(&mut bytes);
    let mut header_slots = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut header_slots);
    let head_len = match response.parse(&bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!(
            "no HTTP head ({other:?}) in {:?}",
            String::from_utf8_lossy(&bytes)
        ),
    };
    let headers: Vec<(String, String)> = response
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let mut reply = Reply {
        status: response.code.expect("a status"),
        headers,
        body: Vec::new(),
    };
    let length: usize = reply
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .expect("raw answers carry a Content-Length");
    reply.body = bytes[head_len..][..length].to_vec();
    reply
}

// ---------------------------------------------------------------------------------------------
// The server process.

struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `sd21 serve` with the tiny model on a free port and waits until /ready says 200.
    fn start(extra: &[&str]) -> Server {
        Self::start_model(&tiny_model(), extra)
    }

    /// [`Server::start`] with the model folder `model`.
    fn start_model(model: &std::path::Path, extra: &[&str]) -> Server {
        let server = Self::spawn_model(model, extra);
        server.wait_until("ready", |s| get(s.addr, "/ready", &[]).status == 200);
        server
    }

    fn spawn(extra: &[&str]) -> Server {
        Self::spawn_model(&tiny_model(), extra)
    }

    fn spawn_model(model: &std::path::Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sd21"))
            .args(["serve", "--model"])
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .env_remove("SD21_API_KEY")
            .env_remove("SD21_CORS_ORIGIN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sd21 serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread_log = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = sd21::server::listening_address(&line) {
                    let _ = tx.send(addr);
                }
                let mut log = thread_log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the server never said where it listens:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        Server { child, addr, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Polls `condition` every 20 ms for up to 3 minutes.
    fn wait_until(&self, what: &str, condition: impl Fn(&Server) -> bool) {
        let end = Instant::now() + Duration::from_secs(180);
        while Instant::now() < end {
            if condition(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("timed out waiting for {what}; server log:\n{}", self.log());
    }

    fn metrics(&self) -> String {
        self.metrics_with(&[])
    }

    fn metrics_with(&self, headers: &[(&str, &str)]) -> String {
        let reply = get(self.addr, "/metrics", headers);
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.text()
    }

    /// The value of one sample (`name{labels}`) in /metrics; 0 when absent.
    fn metric(&self, sample: &str) -> f64 {
        metric(&self.metrics(), sample)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("metric value"))
}

/// Sends a request and returns the open socket without reading (the caller hangs up later).
fn send_and_hold(addr: SocketAddr, body: &Value) -> TcpStream {
    let body = body.to_string();
    let head = format!(
        "POST /generate/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}",
        body.len()
    );
    let raw = raw_request(&head, body.as_bytes());
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.write_all(&raw).expect("send");
    stream
}

/// A job that takes tens of seconds on the CPU.
fn slow_job() -> Value {
    json!({"prompt": "slow", "width": 256, "height": 256, "steps": 150, "seed": 1})
}

// ---------------------------------------------------------------------------------------------
// Images.

fn base64_png(value: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(value.as_str().expect("a base64 string"))
        .expect("valid base64")
}

/// The pixels of cell (row, col) of a grid of `w`×`h` tiles.
fn grid_cell(
    pixels: &[u8],
    grid_width: usize,
    w: usize,
    h: usize,
    row: usize,
    col: usize,
) -> Vec<u8> {
    (0..h)
        .flat_map(|y| {
            let start = ((row * h + y) * grid_width + col * w) * 3;
            pixels[start..start + w * 3].to_vec()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn png_answer_has_the_size_the_seed_header_the_parameters_and_equals_the_cli() {
    let server = Server::start(&[]);
    let body = json!({
        "prompt": "a cat", "negative_prompt": "blurry", "width": 72, "height": 56,
        "steps": 3, "cfg_scale": 5, "scheduler": "euler_a", "seed": 208513106212u64,
    });
    let reply = generate(server.addr, Some("image/png"), &body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("image/png"));
    assert_eq!(reply.header("x-seeds"), Some("208513106212"));
    let (w, h, _, text) = decode_png(&reply.body);
    assert_eq!((w, h), (72, 56));
    assert_eq!(
        text,
        "a cat\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 5, Seed: 208513106212, Size: 72x56, Model: tiny-sd21"
    );

    // `sd21 generate` with the same settings writes the same bytes.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cli.png");
    let status = Command::new(env!("CARGO_BIN_EXE_sd21"))
        .args(["generate", "--model"])
        .arg(tiny_model())
        .args([
            "--prompt",
            "a cat",
            "--negative-prompt",
            "blurry",
            "--width",
            "72",
        ])
        .args([
            "--height",
            "56",
            "--steps",
            "3",
            "--cfg-scale",
            "5",
            "--scheduler",
            "euler_a",
        ])
        .args(["--seed", "208513106212", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        reply.body,
        "server PNG equals the CLI's"
    );
}

#[test]
fn defaults_apply_and_no_accept_wildcard_accept_and_the_path_without_slash_give_png() {
    let server = Server::start(&[]);
    let body = json!({"prompt": "a dog", "steps": 2});
    for accept in [None, Some("*/*"), Some("image/*")] {
        let reply = generate(server.addr, accept, &body);
        assert_eq!(reply.status, 200, "{accept:?}: {}", reply.text());
        assert_eq!(
            reply.header("content-type"),
            Some("image/png"),
            "{accept:?}"
        );
        let (w, h, _, text) = decode_png(&reply.body);
        assert_eq!((w, h), (64, 64), "the model's native size");
        let seed: u64 = reply
            .header("x-seeds")
            .expect("X-Seeds")
            .parse()
            .expect("a seed");
        assert!(text.contains(&format!("Seed: {seed},")), "{text}");
        assert!(
            text.contains("Sampler: PLMS, CFG scale: 7,"),
            "model's scheduler, cfg 7: {text}"
        );
    }
    // Without the trailing slash, and without a Content-Type (taken as JSON, as FastAPI does)
    // or an Accept header (raw: a client library adds one).
    let body = br#"{"prompt": "a dog", "steps": 2}"#;
    let head = format!(
        "POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}",
        body.len()
    );
    let reply = exchange_raw(server.addr, &raw_request(&head, body));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("image/png"));

    // Every default, seen in the JSON answer.
    let reply = generate(
        server.addr,
        Some("application/json"),
        &json!({"prompt": "x"}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let p = &reply.json()["parameters"];
    assert_eq!(
        (&p["width"], &p["height"], &p["steps"], &p["cfg_scale"]),
        (&json!(64), &json!(64), &json!(30), &json!(7.0))
    );
    assert_eq!(
        (&p["scheduler"], &p["number_of_images"]),
        (&json!("pndm"), &json!(1))
    );
    assert_eq!(p["negative_prompt"], "");
}

#[test]
fn json_answer_has_base64_pngs_seeds_parameters_and_timings() {
    let server = Server::start(&[]);
    let body = json!({"prompt": "a fox", "width": 64, "height": 80, "steps": 2,
                      "number_of_images": 2, "seed": 41, "scheduler": "ddim", "cfg_scale": 6.5});
    let reply = generate(server.addr, Some("application/json"), &body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply
        .header("content-type")
        .unwrap_or("")
        .starts_with("application/json"));
    assert_eq!(reply.header("x-seeds"), Some("41,42"));
    let answer = reply.json();
    assert_eq!(answer["seeds"], json!([41, 42]));
    let images = answer["images"].as_array().expect("images");
    assert_eq!(images.len(), 2);
    for (i, image) in images.iter().enumerate() {
        let (w, h, _, text) = decode_png(&base64_png(image));
        assert_eq!((w, h), (64, 80));
        assert!(text.contains(&format!("Seed: {},", 41 + i)), "{text}");
        assert!(text.contains("Sampler: DDIM, CFG scale: 6.5"), "{text}");
    }
    let p = &answer["parameters"];
    assert_eq!(p["prompt"], "a fox");
    assert_eq!(
        (&p["seed"], &p["steps"], &p["scheduler"]),
        (&json!(41), &json!(2), &json!("ddim"))
    );
    assert_eq!(
        (&p["model"], &p["number_of_images"]),
        (&json!("tiny-sd21"), &json!(2))
    );
    for key in [
        "queue_seconds",
        "generation_seconds",
        "encode_seconds",
        "total_seconds",
    ] {
        let t = answer["timings"][key].as_f64().unwrap_or(-1.0);
        assert!(t >= 0.0, "timings.{key} = {t}");
    }
}

#[test]
fn same_seed_same_bytes_and_batch_image_i_equals_a_single_request_with_seed_plus_i() {
    let server = Server::start(&[]);
    let seed = 208513106212u64;
    let batch = |n: u64, seed: u64, accept: &str| {
        let body = json!({"prompt": "a boat", "width": 64, "height": 72, "steps": 3,
                          "scheduler": "euler_a", "number_of_images": n, "seed": seed});
        let reply = generate(server.addr, Some(accept), &body);
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply
    };
    let json_images = |reply: &Reply| -> Vec<Vec<u8>> {
        reply.json()["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(base64_png)
            .collect()
    };
    let three = json_images(&batch(3, seed, "application/json"));
    assert_eq!(
        three,
        json_images(&batch(3, seed, "application/json")),
        "same seed, same bytes"
    );
    assert_ne!(three[0], three[1]);
    for i in 1..3 {
        let single = json_images(&batch(1, seed + i, "application/json"));
        assert_eq!(
            single[0], three[i as usize],
            "image {i} equals seed + {i} alone"
        );
    }
    // The PNG answer for several images is A1111's grid: 3 images → 1 row × 3 columns.
    let grid = batch(3, seed, "image/png");
    assert_eq!(
        grid.header("x-seeds"),
        Some("208513106212,208513106213,208513106214")
    );
    let (gw, gh, pixels, text) = decode_png(&grid.body);
    assert_eq!((gw, gh), (3 * 64, 72));
    assert!(
        text.contains("Seed: 208513106212,"),
        "the grid carries image 0's parameters"
    );
    for (i, png) in three.iter().enumerate() {
        let (_, _, tile, _) = decode_png(png);
        assert_eq!(
            grid_cell(&pixels, gw as usize, 64, 72, 0, i),
            tile,
            "grid cell {i}"
        );
    }
    // 4 images → 2 × 2, row-major.
    let (gw, gh, pixels, _) = decode_png(&batch(4, seed, "image/png").body);
    assert_eq!((gw, gh), (2 * 64, 2 * 72));
    let (_, _, fourth, _) = decode_png(&json_images(&batch(1, seed + 3, "application/json"))[0]);
    assert_eq!(grid_cell(&pixels, gw as usize, 64, 72, 1, 1), fourth);
}

/// `POST /img2img/` equals diffusers' StableDiffusionImg2ImgPipeline (reference/img2img.*: the
/// ddim 0.75 case), with a data: URL prefix too; bad images and strengths are 422 naming the
/// field; the spec lists the route with its limits.
#[test]
fn img2img_route_equals_diffusers_and_refuses_bad_images_by_field() {
    let server = Server::start(&[]);
    let fixture = common::FixtureImages::open("img2img.safetensors");
    let png = fixture.png("init");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let body = |init_image: &str, strength: Value| {
        json!({
            "prompt": "a photograph of an astronaut riding a horse",
            "negative_prompt": "blurry, low quality",
            "init_image": init_image, "strength": strength, "steps": 7, "cfg_scale": 7.5,
            "scheduler": "ddim", "seed": 208513106212u64,
        })
    };
    let post = |body: &Value| {
        let headers = [
            ("Content-Type", "application/json"),
            ("Accept", "image/png"),
        ];
        send(
            server.addr,
            "POST",
            "/img2img/",
            &headers,
            Some(body.to_string().as_bytes()),
        )
    };
    let expected = fixture.image("ddim_strength0.75");
    for init_image in [b64.clone(), format!("data:image/png;base64,{b64}")] {
        let reply = post(&body(&init_image, json!(0.75)));
        assert_eq!(reply.status, 200, "{}", reply.text());
        let (w, h, pixels, text) = decode_png(&reply.body);
        assert_eq!((w, h), (72, 56));
        assert!(text.contains("Denoising strength: 0.75"), "{text}");
        assert!(!text.contains("Mask blur"), "{text}");
        let max = common::max_pixel_diff(&pixels, &expected.pixels);
        assert!(max <= 2, "max |diff| {max}/255 against diffusers");
    }
    let text_b64 = base64::engine::general_purpose::STANDARD.encode(b"not an image");
    let cases: Vec<(&str, Value, &str)> = vec![
        ("no init image", json!({"prompt": "a"}), "init_image"),
        ("not base64", body("%%%", json!(0.5)), "init_image"),
        ("not an image", body(&text_b64, json!(0.5)), "init_image"),
        (
            "truncated image",
            body(
                &base64::engine::general_purpose::STANDARD.encode(&png[..png.len() / 2]),
                json!(0.5),
            ),
            "init_image",
        ),
        (
            "decompression bomb",
            body(
                &base64::engine::general_purpose::STANDARD.encode(png_bomb(60_000, 60_000)),
                json!(0.5),
            ),
            "init_image",
        ),
        ("strength above 1", body(&b64, json!(1.5)), "strength"),
        ("no step left", body(&b64, json!(0.05)), "strength"),
    ];
    for (what, body, field) in cases {
        let reply = post(&body);
        assert_eq!(reply.status, 422, "{what}: {}", reply.text());
        assert_eq!(reply.json()["field"], field, "{what}: {}", reply.text());
    }
    // Image i of a multi-image request is the single request with seed + i.
    let json_headers = [
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
    ];
    let mut two = body(&b64, json!(0.6));
    two["number_of_images"] = json!(2);
    two["steps"] = json!(3);
    let post_json = |body: &Value| {
        send(
            server.addr,
            "POST",
            "/img2img/",
            &json_headers,
            Some(body.to_string().as_bytes()),
        )
    };
    let reply = post_json(&two);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let both = reply.json();
    assert_eq!(both["parameters"]["strength"], 0.6);
    let mut second = two.clone();
    second["number_of_images"] = json!(1);
    second["seed"] = json!(208513106213u64);
    let reply = post_json(&second);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let png = |v: &Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .unwrap()
    };
    assert_eq!(
        decode_png(&png(&both["images"][1])).2,
        decode_png(&png(&reply.json()["images"][0])).2,
        "image 1 of two equals the single request with seed + 1"
    );
    let spec = get(server.addr, "/openapi.json", &[]).json();
    assert!(
        spec["paths"]["/img2img/"]["post"].is_object(),
        "{}",
        spec["paths"]
    );
    let schema = &spec["components"]["schemas"]["Img2ImgRequest"];
    assert_eq!(schema["required"], json!(["prompt", "init_image"]));
    assert_eq!(
        schema["properties"]["strength"]["maximum"].as_f64(),
        Some(1.0)
    );
    assert_eq!(
        schema["properties"]["steps"]["maximum"].as_f64(),
        Some(150.0)
    );
}

/// A decompression bomb: a PNG of `width × height` black pixels whose file holds only the first
/// rows' compressed data (a few hundred bytes that claim gigabytes; refused from the header).
fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
        out
    };
    let mut header = width.to_be_bytes().to_vec();
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter set, no interlace
    let mut rows = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let row = vec![0u8; 1 + 3 * width as usize];
    for _ in 0..4 {
        rows.write_all(&row).unwrap();
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &header));
    png.extend(chunk(b"IDAT", &rows.finish().unwrap()));
    png.extend(chunk(b"IEND", &[]));
    png
}

/// An inpainting (9-channel) model: `/inpaint/` equals diffusers (reference/inpainting_model.*,
/// the ddim 1.0 case); `/generate/` and `/img2img/` are 422 saying it is an inpainting model.
#[test]
fn an_inpainting_model_serves_inpaint_only() {
    let server = Server::start_model(&common::tiny_inpainting_model(), &[]);
    let fixture = common::FixtureImages::open("inpaint.safetensors");
    let b64 = |name: &str| base64::engine::general_purpose::STANDARD.encode(fixture.png(name));
    let (image, mask) = (b64("image"), b64("mask"));
    let body = json!({
        "prompt": "a photograph of an astronaut riding a horse",
        "negative_prompt": "blurry, low quality", "image": image, "mask": mask,
        "steps": 7, "cfg_scale": 7.5, "scheduler": "ddim", "seed": 208513106212u64,
    });
    let headers = [
        ("Content-Type", "application/json"),
        ("Accept", "image/png"),
    ];
    let post = |path: &str, body: &Value| {
        send(
            server.addr,
            "POST",
            path,
            &headers,
            Some(body.to_string().as_bytes()),
        )
    };
    let reply = post("/inpaint/", &body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let expected = common::FixtureImages::open("inpainting_model.safetensors");
    let max = common::max_pixel_diff(
        &decode_png(&reply.body).2,
        &expected.image("ddim_strength1.0").pixels,
    );
    assert!(max <= 2, "max |diff| {max}/255 against diffusers");
    let others = [
        ("/generate/", json!({"prompt": "a boat", "steps": 2})),
        (
            "/img2img/",
            json!({"prompt": "a boat", "steps": 2, "init_image": image}),
        ),
    ];
    for (path, body) in others {
        let reply = post(path, &body);
        assert_eq!(reply.status, 422, "{path}: {}", reply.text());
        assert!(
            reply.text().contains("is an inpainting model"),
            "{path}: {}",
            reply.text()
        );
    }
    assert_eq!(get(server.addr, "/health", &[]).status, 200);
}

/// `POST /inpaint/` equals diffusers' StableDiffusionInpaintPipeline (reference/inpaint.*: the
/// ddim 1.0 case); a missing mask is 422 `mask`; a mask of another size is resized to the image.
#[test]
fn inpaint_route_equals_diffusers() {
    let server = Server::start(&[]);
    let fixture = common::FixtureImages::open("inpaint.safetensors");
    let b64 = |name: &str| base64::engine::general_purpose::STANDARD.encode(fixture.png(name));
    let (image, mask) = (b64("image"), b64("mask"));
    let body = json!({
        "prompt": "a photograph of an astronaut riding a horse",
        "negative_prompt": "blurry, low quality", "image": image, "mask": mask,
        "steps": 7, "cfg_scale": 7.5, "scheduler": "ddim", "seed": 208513106212u64,
    });
    let headers = [
        ("Content-Type", "application/json"),
        ("Accept", "image/png"),
    ];
    let reply = send(
        server.addr,
        "POST",
        "/inpaint/",
        &headers,
        Some(body.to_string().as_bytes()),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let (w, h, pixels, text) = decode_png(&reply.body);
    assert_eq!((w, h), (72, 56));
    assert!(
        text.contains("Denoising strength: 1, Mask blur: 0"),
        "{text}"
    );
    let expected = fixture.image("ddim_strength1.0");
    let max = common::max_pixel_diff(&pixels, &expected.pixels);
    assert!(max <= 2, "max |diff| {max}/255 against diffusers");
    let no_mask = json!({"prompt": "a", "image": image});
    let reply = send(
        server.addr,
        "POST",
        "/inpaint/",
        &headers,
        Some(no_mask.to_string().as_bytes()),
    );
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert_eq!(reply.json()["field"], "mask");
    let spec = get(server.addr, "/openapi.json", &[]).json();
    assert!(
        spec["paths"]["/inpaint/"]["post"].is_object(),
        "{}",
        spec["paths"]
    );
    assert_eq!(
        spec["components"]["schemas"]["InpaintRequest"]["required"],
        json!(["prompt", "image", "mask"])
    );
}

/// A `multipart/form-data` body: `(name, file name, bytes)`, a file part when a file name is given.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "sd21-test-boundary-7f3a";
    let mut body = Vec::new();
    for (name, file, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let disposition = match file {
            Some(file) => format!(
                "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\n\
                 Content-Type: image/png\r\n\r\n"
            ),
            None => format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n"),
        };
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// `POST /img2img/` and `/inpaint/` read multipart/form-data with the JSON bodies' names (images
/// as files, the rest as text) and answer as for JSON; `/generate/` does not (415).
#[test]
fn image_routes_read_multipart_forms() {
    let server = Server::start(&[]);
    let fixture = common::FixtureImages::open("inpaint.safetensors");
    let (image, mask) = (fixture.png("image"), fixture.png("mask"));
    let text: [(&str, Option<&str>, &[u8]); 6] = [
        (
            "prompt",
            None,
            b"a photograph of an astronaut riding a horse",
        ),
        ("negative_prompt", None, b"blurry, low quality"),
        ("steps", None, b"7"),
        ("cfg_scale", None, b"7.5"),
        ("scheduler", None, b"ddim"),
        ("seed", None, b"208513106212"),
    ];
    let mut parts = text.to_vec();
    parts.push(("image", Some("image.png"), &image));
    parts.push(("mask", Some("mask.png"), &mask));
    let (content_type, body) = multipart(&parts);
    let headers = [
        ("Content-Type", content_type.as_str()),
        ("Accept", "image/png"),
    ];
    let reply = send(server.addr, "POST", "/inpaint/", &headers, Some(&body));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let expected = fixture.image("ddim_strength1.0");
    let max = common::max_pixel_diff(&decode_png(&reply.body).2, &expected.pixels);
    assert!(
        max <= 2,
        "multipart inpaint: max |diff| {max}/255 against diffusers"
    );

    let mut parts = text.to_vec();
    parts.push(("init_image", Some("init.png"), &image));
    parts.push(("strength", None, b"0.5"));
    let (content_type, body) = multipart(&parts);
    let headers = [
        ("Content-Type", content_type.as_str()),
        ("Accept", "application/json"),
    ];
    let reply = send(server.addr, "POST", "/img2img/", &headers, Some(&body));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["parameters"]["strength"], 0.5);

    let reply = send(server.addr, "POST", "/generate/", &headers, Some(&body));
    assert_eq!(reply.status, 415, "{}", reply.text());
    // A prompt that reads as a number stays text: the schema says prompt is a string.
    let mut numeric_prompt = text.to_vec();
    numeric_prompt[0] = ("prompt", None, b"123");
    numeric_prompt.push(("init_image", Some("init.png"), &image));
    numeric_prompt[2] = ("steps", None, b"2");
    let (content_type, body) = multipart(&numeric_prompt);
    let headers = [
        ("Content-Type", content_type.as_str()),
        ("Accept", "application/json"),
    ];
    let reply = send(server.addr, "POST", "/img2img/", &headers, Some(&body));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["parameters"]["prompt"], "123");
    let spec = get(server.addr, "/openapi.json", &[]).json();
    let content = &spec["paths"]["/img2img/"]["post"]["requestBody"]["content"];
    assert!(content["multipart/form-data"].is_object(), "{content}");
    // Each body type has its schema and example: base64 in JSON, files in the form.
    let schemas = &spec["components"]["schemas"];
    for (name, image_field) in [("Img2Img", "init_image"), ("Inpaint", "image")] {
        let json_schema = &schemas[format!("{name}Request")];
        let form = &schemas[format!("{name}RequestForm")];
        assert_eq!(json_schema["properties"][image_field]["format"], "byte");
        assert_eq!(form["properties"][image_field]["format"], "binary");
        assert!(
            json_schema["example"][image_field].is_string(),
            "{json_schema}"
        );
        assert!(form["example"]["prompt"].is_string(), "{form}");
        assert!(form["example"].get(image_field).is_none(), "{form}");
    }
    assert_eq!(
        content["multipart/form-data"]["schema"]["$ref"],
        "#/components/schemas/Img2ImgRequestForm"
    );
}

#[test]
fn the_original_api_example_request_works() {
    // The README's curl, field for field, at 64×64 instead of 512×512: 30 steps at 512² take
    // about a minute on the tiny model in the test profile. The exact body (512×512) is
    // checked by `request::generate::tests::the_original_api_example_validates`.
    let server = Server::start(&[]);
    let body = br#"{
  "prompt": "Illustration of a Stable Diffusion FastAPI API, comic novel, ligth pastel colors",
  "width": 64,
  "height": 64,
  "cfg_scale": 7,
  "steps": 30,
  "number_of_images": 1,
  "seed": 208513106212
}"#;
    let reply = post(
        server.addr,
        &[
            ("accept", "image/png"),
            ("Content-Type", "application/json"),
        ],
        body,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("image/png"));
    assert_eq!(reply.header("x-seeds"), Some("208513106212"));
    let (w, h, _, text) = decode_png(&reply.body);
    assert_eq!((w, h), (64, 64));
    assert!(
        text.contains("Steps: 30, Sampler: PLMS, CFG scale: 7, Seed: 208513106212"),
        "{text}"
    );
}

/// (what, content type, body, expected status, expected field)
type BadInput = (
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    u16,
    Option<&'static str>,
);

#[test]
fn bad_inputs_get_json_errors_naming_the_field_and_the_server_stays_healthy() {
    let server = Server::start(&[]);
    let long = "x".repeat(2001);
    let json_ct = "application/json";
    let big = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(100_000));
    let too_long = format!(r#"{{"prompt": "{long}"}}"#).into_bytes();
    let j = Some(json_ct);
    #[rustfmt::skip]
    let cases: Vec<BadInput> = vec![
        ("missing prompt", j, br#"{"width": 64}"#.to_vec(), 422, Some("prompt")),
        ("empty object", j, b"{}".to_vec(), 422, Some("prompt")),
        ("prompt not a string", j, br#"{"prompt": 5}"#.to_vec(), 422, Some("prompt")),
        ("prompt too long", j, too_long, 422, Some("prompt")),
        ("negative prompt an array", j, br#"{"prompt": "a", "negative_prompt": ["x"]}"#.to_vec(), 422, Some("negative_prompt")),
        ("width not a multiple of 8", j, br#"{"prompt": "a", "width": 65}"#.to_vec(), 422, Some("width")),
        ("width a fraction", j, br#"{"prompt": "a", "width": 64.5}"#.to_vec(), 422, Some("width")),
        ("height too large", j, br#"{"prompt": "a", "height": 8192}"#.to_vec(), 422, Some("height")),
        ("height zero", j, br#"{"prompt": "a", "height": 0}"#.to_vec(), 422, Some("height")),
        ("too many pixels", j, br#"{"prompt": "a", "width": 2048, "height": 2048}"#.to_vec(), 422, Some("width")),
        ("zero steps", j, br#"{"prompt": "a", "steps": 0}"#.to_vec(), 422, Some("steps")),
        ("too many steps", j, br#"{"prompt": "a", "steps": 151}"#.to_vec(), 422, Some("steps")),
        ("steps a string", j, br#"{"prompt": "a", "steps": "ten"}"#.to_vec(), 422, Some("steps")),
        ("zero images", j, br#"{"prompt": "a", "number_of_images": 0}"#.to_vec(), 422, Some("number_of_images")),
        ("too many images", j, br#"{"prompt": "a", "number_of_images": 9}"#.to_vec(), 422, Some("number_of_images")),
        ("cfg_scale a string", j, br#"{"prompt": "a", "cfg_scale": "high"}"#.to_vec(), 422, Some("cfg_scale")),
        ("negative cfg_scale", j, br#"{"prompt": "a", "cfg_scale": -1}"#.to_vec(), 422, Some("cfg_scale")),
        ("negative seed", j, br#"{"prompt": "a", "seed": -5}"#.to_vec(), 422, Some("seed")),
        ("seed beyond u64", j, br#"{"prompt": "a", "seed": 18446744073709551616}"#.to_vec(), 422, Some("seed")),
        ("seed a string", j, br#"{"prompt": "a", "seed": "abc"}"#.to_vec(), 422, Some("seed")),
        ("unknown scheduler", j, br#"{"prompt": "a", "scheduler": "lms"}"#.to_vec(), 422, Some("scheduler")),
        ("a path as scheduler", j, br#"{"prompt": "a", "scheduler": "../../etc/passwd"}"#.to_vec(), 422, Some("scheduler")),
        ("an array body", j, b"[1, 2]".to_vec(), 422, Some("body")),
        ("truncated JSON", j, br#"{"prompt": "a""#.to_vec(), 400, None),
        ("empty body", j, b"".to_vec(), 400, None),
        ("not JSON", j, b"prompt=a".to_vec(), 400, None),
        ("invalid UTF-8", j, b"{\"prompt\": \"\xff\xfe\"}".to_vec(), 400, None),
        ("text/plain", Some("text/plain"), br#"{"prompt": "a"}"#.to_vec(), 415, None),
        ("a form", Some("application/x-www-form-urlencoded"), b"prompt=a".to_vec(), 415, None),
        ("body over 64 KiB", j, big.clone().into_bytes(), 413, None),
    ];
    assert!(cases.len() >= 15);
    for (what, content_type, body, status, field) in &cases {
        let headers: Vec<(&str, &str)> = content_type
            .iter()
            .map(|ct| ("Content-Type", *ct))
            .collect();
        let reply = if body.len() > 64 * 1024 {
            // Refused on its Content-Length before it is read: raw, as a client library would
            // stop at the write error before reading the answer.
            let mut head = format!(
                "POST /generate/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
                 Content-Length: {}",
                body.len()
            );
            for (name, value) in &headers {
                head.push_str(&format!("\r\n{name}: {value}"));
            }
            exchange_raw(server.addr, &raw_request(&head, body))
        } else {
            post(server.addr, &headers, body)
        };
        assert_eq!(reply.status, *status, "{what}: {}", reply.text());
        assert!(
            reply
                .header("content-type")
                .unwrap_or("")
                .starts_with("application/json"),
            "{what}: {:?}",
            reply.headers
        );
        let error = reply.json();
        let message = error["error"].as_str().unwrap_or("");
        assert!(!message.is_empty(), "{what}: {error}");
        assert_eq!(error["field"].as_str(), *field, "{what}: {error}");
    }
    // The limit and the value are in the message.
    let reply = generate(server.addr, None, &json!({"prompt": "a", "steps": 151}));
    assert_eq!(
        reply.json()["error"],
        "steps must be between 1 and 150 (--max-steps), got 151"
    );
    // A chunked body over the limit (no Content-Length to refuse early).
    let head = "POST /generate/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                Content-Type: application/json\r\nTransfer-Encoding: chunked";
    let mut raw = raw_request(head, b"");
    for chunk in big.as_bytes().chunks(8192) {
        raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let reply = exchange_raw(server.addr, &raw);
    assert_eq!(reply.status, 413, "{}", reply.text());
    // An Accept the endpoint cannot satisfy.
    let reply = generate(server.addr, Some("text/html"), &json!({"prompt": "a"}));
    assert_eq!(reply.status, 406, "{}", reply.text());
    assert!(reply.json()["error"]
        .as_str()
        .unwrap_or("")
        .contains("text/html"));
    // Unknown routes and methods answer JSON too.
    assert_eq!(get(server.addr, "/nope", &[]).json()["error"], "not found");
    assert_eq!(get(server.addr, "/generate/", &[]).status, 405);

    // Still healthy, still generating; nothing reached the engine; no 5xx anywhere.
    assert_eq!(get(server.addr, "/health", &[]).status, 200);
    let reply = generate(server.addr, None, &json!({"prompt": "a", "steps": 1}));
    assert_eq!(reply.status, 200, "{}", reply.text());
    let metrics = server.metrics();
    assert_eq!(
        metric(&metrics, "sd21_requests_total{status=\"422\"}"),
        24.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "sd21_jobs_total{outcome=\"ok\"}"),
        1.0,
        "{metrics}"
    );
    assert!(!metrics.contains("status=\"5"), "{metrics}");
}

#[test]
fn a_full_queue_answers_429_with_retry_after_at_once() {
    let server = Server::start(&["--queue-size", "1"]);
    let running = send_and_hold(server.addr, &slow_job());
    server.wait_until("the first job to run", |s| {
        s.metric("sd21_jobs_running") == 1.0
    });
    let waiting = send_and_hold(server.addr, &slow_job());
    server.wait_until("the second job to wait", |s| {
        s.metric("sd21_queue_depth") == 1.0
    });

    let reply = generate(
        server.addr,
        None,
        &json!({"prompt": "one too many", "steps": 1}),
    );
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert_eq!(reply.header("retry-after"), Some("5"));
    assert!(reply.json()["error"]
        .as_str()
        .unwrap_or("")
        .contains("queue is full"));
    assert_eq!(server.metric("sd21_requests_total{status=\"429\"}"), 1.0);

    // Hanging up frees the engine for new work.
    drop(waiting);
    drop(running);
    server.wait_until("both jobs to be cancelled", |s| {
        s.metric("sd21_jobs_total{outcome=\"cancelled\"}") == 2.0
    });
    let reply = generate(
        server.addr,
        None,
        &json!({"prompt": "now there is room", "steps": 1}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[test]
fn a_client_that_disconnects_cancels_its_job_running_or_queued() {
    let server = Server::start(&[]);
    let running = send_and_hold(server.addr, &slow_job());
    server.wait_until("the job to take steps", |s| {
        s.metric("sd21_step_duration_seconds_count") >= 1.0
    });
    let queued = send_and_hold(server.addr, &slow_job());
    server.wait_until("the second job to queue", |s| {
        s.metric("sd21_queue_depth") == 1.0
    });

    drop(queued);
    drop(running);
    server.wait_until("both jobs to be cancelled", |s| {
        s.metric("sd21_jobs_total{outcome=\"cancelled\"}") == 2.0
    });
    let metrics = server.metrics();
    assert_eq!(
        metric(&metrics, "sd21_requests_total{status=\"499\"}"),
        2.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "sd21_jobs_running"), 0.0);
    // The running job stopped early: far fewer than its 150 steps were taken, and the queued
    // one never started.
    let steps = metric(&metrics, "sd21_step_duration_seconds_count");
    assert!(steps < 140.0, "{steps} steps were taken");
    // The handler logs after the engine counts the job cancelled: wait for the line.
    server.wait_until("the client-went-away log line", |s| {
        s.log().contains("client went away")
    });

    let reply = generate(server.addr, None, &json!({"prompt": "after", "steps": 1}));
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[test]
fn past_its_deadline_a_request_gets_503_and_the_server_keeps_serving() {
    let server = Server::start(&["--request-timeout", "1"]);
    let huge =
        json!({"prompt": "a", "width": 256, "height": 256, "steps": 150, "number_of_images": 8});
    let reply = generate(server.addr, None, &huge);
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("deadline"),
        "{}",
        reply.text()
    );
    server.wait_until("the job to stop", |s| s.metric("sd21_jobs_running") == 0.0);
    assert_eq!(server.metric("sd21_jobs_total{outcome=\"deadline\"}"), 1.0);
    let reply = generate(server.addr, None, &json!({"prompt": "a", "steps": 1}));
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[test]
fn with_an_api_key_everything_but_health_needs_the_bearer_token() {
    let server = Server::spawn(&["--api-key", "s3cret"]);
    let good = [("Authorization", "Bearer s3cret")];
    server.wait_until("ready", |s| get(s.addr, "/ready", &good).status == 200);
    assert_eq!(get(server.addr, "/health", &[]).status, 200);
    for path in ["/ready", "/metrics", "/openapi.json", "/docs"] {
        let reply = get(server.addr, path, &[]);
        assert_eq!(reply.status, 401, "{path}");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        assert!(reply.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("Authorization"));
    }
    let body = br#"{"prompt": "a", "steps": 1}"#;
    let ct = ("Content-Type", "application/json");
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("s3cret"),
        Some("Basic s3cret"),
    ] {
        let mut headers = vec![ct];
        headers.extend(auth.map(|a| ("Authorization", a)));
        let reply = post(server.addr, &headers, body);
        assert_eq!(reply.status, 401, "{auth:?}");
    }
    let reply = post(server.addr, &[ct, good[0]], body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(!server.log().contains("s3cret"), "the key is never logged");
    assert!(server
        .metrics_with(&good)
        .contains("sd21_requests_total{status=\"200\"} 1"));
}

/// Issue 15 #7: a compressed body was read as JSON ("malformed JSON"); any Content-Encoding but
/// identity is now refused with 415 and `Accept-Encoding: identity`, whatever the route.
#[test]
fn encoded_bodies_are_refused_with_415() {
    let server = Server::start(&[]);
    let body = json!({"prompt": "a", "steps": 0}).to_string();
    let json_ct = ("Content-Type", "application/json");
    for encoding in ["gzip", "deflate", "br", "identity, gzip"] {
        for path in ["/generate/", "/jobs"] {
            let reply = send(
                server.addr,
                "POST",
                path,
                &[json_ct, ("Content-Encoding", encoding)],
                Some(body.as_bytes()),
            );
            assert_eq!(reply.status, 415, "{encoding} {path}: {}", reply.text());
            assert_eq!(reply.header("accept-encoding"), Some("identity"));
            assert!(reply.json()["error"]
                .as_str()
                .is_some_and(|e| e.contains("Content-Encoding")));
        }
    }
    // identity is no encoding: the body is read and validated (steps 0 → 422).
    let reply = post(
        server.addr,
        &[json_ct, ("Content-Encoding", "identity")],
        body.as_bytes(),
    );
    assert_eq!(reply.status, 422, "{}", reply.text());
}

/// Issue 15 #6: a 413 on a keep-alive connection says `Connection: close` (the server closes
/// it: the unread body would be taken for the next request).
#[test]
fn payload_too_large_closes_the_connection_and_says_so() {
    let server = Server::start(&[]);
    let body = vec![b'x'; 100_000];
    let head = format!(
        "POST /generate/ HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\
         Content-Type: application/json\r\nContent-Length: {}",
        body.len()
    );
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let _ = stream.write_all(&raw_request(&head, &body));
    let mut bytes = Vec::new();
    // Ends at the server's close (or the timeout, which the header check below then reports).
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 413"), "{text}");
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
}

/// Issue 15 #5: a 405 names the route's methods (RFC 9110), and /docs and /openapi.json take
/// GET (and HEAD) only, as every other route takes only its own methods.
#[test]
fn method_not_allowed_names_the_allowed_methods() {
    let server = Server::start(&[]);
    for (method, path, allow) in [
        ("GET", "/generate/", "POST"),
        ("PUT", "/generate", "POST"),
        ("POST", "/health", "GET"),
        ("PUT", "/jobs/0123", "DELETE, GET"),
        ("DELETE", "/docs", "GET, HEAD"),
        ("POST", "/openapi.json", "GET, HEAD"),
    ] {
        let reply = send(server.addr, method, path, &[], None);
        assert_eq!(reply.status, 405, "{method} {path}: {}", reply.text());
        assert_eq!(reply.header("allow"), Some(allow), "{method} {path}");
        assert!(
            reply.json()["error"].is_string(),
            "{method} {path}: JSON error"
        );
    }
    for path in ["/docs", "/openapi.json"] {
        assert_eq!(
            send(server.addr, "HEAD", path, &[], None).status,
            200,
            "HEAD {path}"
        );
        assert_eq!(get(server.addr, path, &[]).status, 200, "GET {path}");
    }
}

#[test]
fn cors_headers_only_with_cors_origin() {
    let preflight = |addr| {
        send(
            addr,
            "OPTIONS",
            "/generate/",
            &[
                ("Origin", "http://app.example"),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "content-type"),
            ],
            None,
        )
    };
    let plain = Server::start(&[]);
    let reply = get(plain.addr, "/health", &[("Origin", "http://app.example")]);
    assert_eq!(reply.header("access-control-allow-origin"), None);
    assert_eq!(
        preflight(plain.addr).header("access-control-allow-origin"),
        None
    );

    let cors = Server::spawn(&["--cors-origin", "http://app.example", "--api-key", "k"]);
    cors.wait_until("ready", |s| {
        get(s.addr, "/ready", &[("Authorization", "Bearer k")]).status == 200
    });
    let reply = preflight(cors.addr);
    assert_eq!(
        reply.status,
        200,
        "preflight needs no key: {}",
        reply.text()
    );
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("http://app.example")
    );
    let reply = get(cors.addr, "/health", &[("Origin", "http://app.example")]);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("http://app.example")
    );
    // /health is 200 for everyone (issue 15 #9: it answered 403 to a foreign Origin), without
    // CORS headers for a foreign one; every other route still refuses that Origin.
    let reply = get(cors.addr, "/health", &[("Origin", "http://evil.example")]);
    assert_eq!(reply.header("access-control-allow-origin"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = get(
        cors.addr,
        "/openapi.json",
        &[
            ("Origin", "http://evil.example"),
            ("Authorization", "Bearer k"),
        ],
    );
    assert_eq!(reply.header("access-control-allow-origin"), None);
    assert_eq!(reply.status, 403, "{}", reply.text());
}

#[test]
fn openapi_spec_and_docs_describe_both_content_types_errors_limits_and_the_example() {
    let server = Server::start(&["--max-steps", "50", "--max-images", "4"]);
    let reply = get(server.addr, "/openapi.json", &[]);
    assert_eq!(reply.status, 200);
    assert!(reply
        .header("content-type")
        .unwrap_or("")
        .starts_with("application/json"));
    let spec = reply.json();
    let op = &spec["paths"]["/generate/"]["post"];
    assert!(
        op.is_object(),
        "POST /generate/ is documented: {}",
        spec["paths"]
    );
    let ok = &op["responses"]["200"]["content"];
    assert!(ok["image/png"].is_object(), "{ok}");
    let json_type = ok
        .as_object()
        .and_then(|o| {
            o.keys()
                .find(|k| k.starts_with("application/json"))
                .cloned()
        })
        .expect("a JSON 200 content type");
    assert_eq!(
        ok[&json_type]["schema"]["$ref"],
        "#/components/schemas/GenerateResult"
    );
    for status in ["400", "413", "415", "422", "429", "503"] {
        assert!(op["responses"][status].is_object(), "{status} documented");
    }
    let error_ref =
        &op["responses"]["422"]["content"]["application/json; charset=utf-8"]["schema"]["$ref"];
    assert_eq!(error_ref, "#/components/schemas/ErrorBody");
    let error_schema = &spec["components"]["schemas"]["ErrorBody"]["properties"];
    assert!(error_schema["error"].is_object() && error_schema["field"].is_object());
    assert!(op["responses"]["429"]["headers"]["Retry-After"].is_object());

    let request = &spec["components"]["schemas"]["GenerateRequest"];
    assert_eq!(request["required"], json!(["prompt"]));
    let props = &request["properties"];
    // Issue 15 #8: every optional field takes null (the default), and the spec says so.
    for (field, property) in props.as_object().expect("properties") {
        let nullable = property["nullable"].as_bool().unwrap_or(false);
        assert_eq!(nullable, field != "prompt", "{field}: {property}");
    }
    // Bounds are JSON numbers (poem-openapi writes them as floats: 50.0).
    let bound = |field: &str, key: &str| props[field][key].as_f64();
    assert_eq!(
        bound("steps", "maximum"),
        Some(50.0),
        "the configured --max-steps"
    );
    assert_eq!(bound("number_of_images", "maximum"), Some(4.0));
    assert_eq!(bound("width", "multipleOf"), Some(8.0));
    assert_eq!(props["prompt"]["maxLength"], 2000);
    assert_eq!(request["example"]["seed"], 208513106212u64);
    assert_eq!(request["example"]["cfg_scale"], 7.0);

    let docs = get(server.addr, "/docs", &[]);
    assert_eq!(docs.status, 200);
    let html = docs.text();
    assert!(html.contains("SwaggerUIBundle"), "Swagger UI");
    assert!(
        html.contains("\"maximum\": 50"),
        "the page embeds the served spec"
    );
}

#[test]
fn health_ready_and_metrics() {
    let server = Server::start(&[]);
    assert_eq!(get(server.addr, "/health", &[]).json()["status"], "ok");
    let ready = get(server.addr, "/ready", &[]).json();
    assert_eq!(
        (&ready["ready"], &ready["model"]),
        (&json!(true), &json!("tiny-sd21"))
    );
    let body = json!({"prompt": "a", "steps": 3, "number_of_images": 2, "scheduler": "ddim"});
    let reply = generate(server.addr, None, &body);
    assert_eq!(reply.status, 200);
    let metrics = server.metrics();
    for sample in [
        "sd21_requests_total{status=\"200\"} 1",
        "sd21_images_total 2",
        "sd21_queue_depth 0",
        "sd21_request_duration_seconds_count 1",
        "sd21_ready 1",
        "sd21_jobs_total{outcome=\"ok\"} 1",
    ] {
        assert!(metrics.contains(sample), "{sample} missing:\n{metrics}");
    }
    // Steps 2 and 3 of both images are timed (step 1 also holds encoding or decoding).
    assert_eq!(
        metric(&metrics, "sd21_step_duration_seconds_count"),
        4.0,
        "{metrics}"
    );
    // The request's log line may follow its answer by a moment.
    server.wait_until("the request log line", |s| {
        s.log().contains("path=\"/generate/\" status=200")
    });
}

/// Starts a 256² generation of `steps` steps, waits until it runs, then sends the server
/// SIGTERM; the handle answers with the request's reply.
fn sigterm_during_generation(server: &Server, steps: u32) -> std::thread::JoinHandle<Reply> {
    let addr = server.addr;
    let in_flight = std::thread::spawn(move || {
        generate(
            addr,
            None,
            &json!({"prompt": "a", "width": 256, "height": 256, "steps": steps}),
        )
    });
    server.wait_until("the job to run", |s| s.metric("sd21_jobs_running") == 1.0);
    // SAFETY: kill(2) on our own child's pid, with a valid signal number.
    let rc = unsafe { libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    in_flight
}

/// The server process's exit status, waited for up to `within`.
fn wait_for_exit(server: &mut Server, within: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + within;
    loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < end, "no exit:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_finishes_the_request_in_flight_and_exits_zero() {
    let mut server = Server::start(&[]);
    let in_flight = sigterm_during_generation(&server, 12);
    server.wait_until("the shutdown to begin", |s| {
        s.log().contains("shutting down")
    });
    server.wait_until("new connections to be refused", |s| {
        TcpStream::connect(s.addr).is_err()
    });
    let reply = in_flight.join().expect("client thread");
    assert_eq!(
        reply.status,
        200,
        "the in-flight request completes: {}",
        reply.text()
    );
    let (w, h, _, _) = decode_png(&reply.body);
    assert_eq!((w, h), (256, 256));

    let status = wait_for_exit(&mut server, Duration::from_secs(120));
    assert_eq!(status.code(), Some(0), "{}", server.log());
    let log = server.log();
    assert!(
        log.contains("SIGTERM received") && log.contains("stopped"),
        "{log}"
    );
}

/// Issue 15 #3: a request still running when `--shutdown-timeout` ends is answered 503 (its
/// job stopped at the next step) instead of losing its connection unanswered.
#[test]
fn sigterm_answers_503_to_work_still_running_at_the_shutdown_timeout() {
    // 4 s: the running job is stopped 2 s before the end, far more than one 256² step takes.
    let mut server = Server::start(&["--shutdown-timeout", "4"]);
    let started = Instant::now();
    let in_flight = sigterm_during_generation(&server, 150);
    let Ok(reply) = in_flight.join() else {
        std::thread::sleep(Duration::from_secs(1)); // the rest of the log
        panic!("no answer:\n{}", server.log());
    };
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.json()["error"].is_string(), "{}", reply.text());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "answered only after {:?}",
        started.elapsed()
    );
    let status = wait_for_exit(&mut server, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", server.log());
}

#[test]
fn a_missing_model_fails_at_start_with_a_clear_message() {
    let output = Command::new(env!("CARGO_BIN_EXE_sd21"))
        .args(["serve", "--model", "/nonexistent/model", "--port", "0"])
        .env_remove("SD21_API_KEY")
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/model"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// In-process, with a stand-in model that fails on demand.

mod failing_model {
    use super::*;
    use sd21::sampling::SchedulerKind;
    use sd21::server::{serve, ServerConfig};
    use sd21::testing::FakeGenerator;

    #[test]
    fn a_device_failure_is_503_a_panic_500_and_the_server_keeps_serving() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap();
            let load = FakeGenerator::new(SchedulerKind::EulerAncestral).loader();
            runtime.block_on(serve(ServerConfig::default(), load, listener, async {
                let _ = stop_rx.await;
            }))
        });
        let end = Instant::now() + Duration::from_secs(60);
        while get(addr, "/ready", &[]).status != 200 {
            assert!(Instant::now() < end, "never ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Out of memory is the device's state (503, retry later); a panic is a bug (500).
        for (prompt, status, says, retry_after) in [
            ("oom", 503, "unavailable", Some("5")),
            ("panic", 500, "generation failed", None),
            ("oom", 503, "unavailable", Some("5")),
        ] {
            let reply = generate(addr, None, &json!({"prompt": prompt, "steps": 2}));
            assert_eq!(reply.status, status, "{prompt}: {}", reply.text());
            assert_eq!(reply.header("retry-after"), retry_after, "{prompt}");
            let error = reply.json()["error"].as_str().unwrap_or("").to_string();
            assert!(error.contains(says), "{prompt}: {error}");
        }
        let reply = generate(
            addr,
            Some("application/json"),
            &json!({"prompt": "fine", "steps": 2}),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["parameters"]["scheduler"], "euler_a");
        let metrics = get(addr, "/metrics", &[]).text();
        assert_eq!(
            metric(&metrics, "sd21_jobs_total{outcome=\"unavailable\"}"),
            2.0,
            "{metrics}"
        );
        assert_eq!(
            metric(&metrics, "sd21_jobs_total{outcome=\"panicked\"}"),
            1.0,
            "{metrics}"
        );
        assert_eq!(
            metric(&metrics, "sd21_requests_total{status=\"503\"}"),
            2.0,
            "{metrics}"
        );
        assert_eq!(
            metric(&metrics, "sd21_requests_total{status=\"500\"}"),
            1.0,
            "{metrics}"
        );

        stop_tx.send(()).unwrap();
        let result = server.join().expect("server thread");
        assert!(result.is_ok(), "{result:?}");
    }
}

/// One Server-Sent Event as the jobs API sends it.
#[derive(Debug)]
struct Sse {
    id: u64,
    event: String,
    data: Value,
}

/// `GET /jobs/{id}/events` (after `last_event_id`) read to its end: the stream closes after the
/// job's final event.
fn job_events(addr: SocketAddr, id: &str, last_event_id: Option<u64>) -> Vec<Sse> {
    let resume = last_event_id.map(|n| n.to_string());
    let mut headers = vec![("Accept", "text/event-stream")];
    if let Some(n) = &resume {
        headers.push(("Last-Event-ID", n.as_str()));
    }
    let reply = get(addr, &format!("/jobs/{id}/events"), &headers);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/event-stream")));
    reply
        .text()
        .split("\n\n")
        .filter(|block| block.contains("data:"))
        .map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            Sse {
                id: field("id:").parse().unwrap_or(0),
                event: field("event:"),
                data: serde_json::from_str(&field("data:")).unwrap(),
            }
        })
        .collect()
}

/// `(image, step)` of each `step` event, in order.
fn step_events(events: &[Sse]) -> Vec<(u64, u64)> {
    events
        .iter()
        .filter(|e| e.event == "step")
        .map(|e| {
            let p = &e.data["progress"];
            (p["image"].as_u64().unwrap(), p["step"].as_u64().unwrap())
        })
        .collect()
}

fn create_job(addr: SocketAddr, body: &Value) -> Reply {
    send(
        addr,
        "POST",
        "/jobs",
        &[("Content-Type", "application/json")],
        Some(body.to_string().as_bytes()),
    )
}

/// `POST /jobs` → 202; the events come in order (queued, steps with previews, done) with ids
/// 1, 2, …, and `Last-Event-ID` resumes after one; the results equal the synchronous route's;
/// bad bodies are 422 naming the field, unknown ids 404.
#[test]
fn a_job_reports_its_progress_over_sse_and_ends_with_the_sync_routes_images() {
    let server = Server::start(&[]);
    let body = json!({
        "prompt": "a red boat", "width": 32, "height": 32, "steps": 4, "seed": 11,
        "scheduler": "euler_a", "number_of_images": 2,
    });
    let mut job_body = body.clone();
    job_body["preview_every"] = json!(2);
    let reply = create_job(server.addr, &job_body);
    assert_eq!(reply.status, 202, "{}", reply.text());
    let created = reply.json();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "128 bits in hex");
    assert_eq!(created["status_url"], format!("/jobs/{id}"));
    assert_eq!(created["events_url"], format!("/jobs/{id}/events"));

    let events = job_events(server.addr, &id, None);
    let ids: Vec<u64> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=events.len() as u64).collect::<Vec<_>>());
    assert_eq!(events[0].event, "queued");
    let last = events.last().unwrap();
    assert_eq!(
        (last.event.as_str(), &last.data["status"]),
        ("done", &json!("done"))
    );
    for e in &events {
        assert_eq!(e.data["type"], e.event.as_str(), "{:?}", e.data);
        assert_eq!(e.data["event_id"], e.id);
    }
    let steps = step_events(&events);
    assert_eq!(
        steps,
        [
            (0, 1),
            (0, 2),
            (0, 3),
            (0, 4),
            (1, 1),
            (1, 2),
            (1, 3),
            (1, 4)
        ]
    );
    let previews: Vec<&Sse> = events.iter().filter(|e| e.event == "preview").collect();
    assert_eq!(previews.len(), 4, "steps 2 and 4 of both images");
    for p in &previews {
        let url = p.data["preview"].as_str().unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(url.strip_prefix("data:image/png;base64,").unwrap())
            .unwrap();
        assert_eq!(decode_png(&png).0, 4, "latent size: 32 / 8");
    }
    let resumed = job_events(server.addr, &id, Some(5));
    assert_eq!(
        resumed.iter().map(|e| e.id).collect::<Vec<_>>(),
        (6..=events.len() as u64).collect::<Vec<_>>()
    );

    let status = get(server.addr, &format!("/jobs/{id}"), &[]).json();
    assert_eq!(status["status"], "done");
    assert_eq!(status["seeds"], json!([11, 12]));
    let sync = generate(server.addr, Some("application/json"), &body).json();
    for i in 0..2 {
        let url = format!("/jobs/{id}/images/{i}.png");
        assert_eq!(status["images"][i], url.as_str());
        let image = get(server.addr, &url, &[]);
        assert_eq!(image.status, 200);
        assert_eq!(image.header("content-type"), Some("image/png"));
        let (_, _, pixels, text) = decode_png(&image.body);
        assert!(text.contains(&format!("Seed: {}", 11 + i)), "{text}");
        let expected = base64_png(&sync["images"][i]);
        assert_eq!(
            pixels,
            decode_png(&expected).2,
            "image {i} equals /generate/'s"
        );
    }
    assert_eq!(
        get(server.addr, &format!("/jobs/{id}/images/2.png"), &[]).status,
        404
    );

    let fixture = common::FixtureImages::open("inpaint.safetensors");
    let image = base64::engine::general_purpose::STANDARD.encode(fixture.png("image"));
    let img2img = json!({"kind": "img2img", "prompt": "a", "steps": 2, "init_image": image});
    let reply = create_job(server.addr, &img2img);
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_string();
    let last = job_events(server.addr, &id, None).pop().unwrap();
    assert_eq!(last.event, "done", "{:?}", last.data);
    let bad = [
        (json!({"kind": "img2img", "prompt": "a"}), "init_image"),
        (json!({"kind": "upscale", "prompt": "a"}), "kind"),
        (json!({"prompt": "a", "steps": 0}), "steps"),
        (json!({"prompt": "a", "preview_every": -1}), "preview_every"),
    ];
    for (body, field) in bad {
        let reply = create_job(server.addr, &body);
        assert_eq!(reply.status, 422, "{body}: {}", reply.text());
        assert_eq!(reply.json()["field"], field);
    }
    for path in ["/jobs/0123", "/jobs/0123/events", "/jobs/0123/images/0.png"] {
        assert_eq!(get(server.addr, path, &[]).status, 404, "{path}");
    }
    assert_eq!(
        send(server.addr, "DELETE", "/jobs/0123", &[], None).status,
        404
    );
}

/// `DELETE /jobs/{id}`: a queued job is cancelled at once (it leaves the queue), a running one
/// at its next step; both streams end with `cancelled`; a finished job answers 409.
#[test]
fn jobs_are_cancelled_while_queued_and_while_running() {
    let server = Server::start(&[]);
    let long = json!({"prompt": "a", "width": 64, "height": 64, "steps": 150,
                      "number_of_images": 8, "scheduler": "ddim"});
    let id_of = |reply: Reply| {
        assert_eq!(reply.status, 202, "{}", reply.text());
        reply.json()["id"].as_str().unwrap().to_string()
    };
    let running = id_of(create_job(server.addr, &long));
    let queued = id_of(create_job(server.addr, &long));
    let status = |id: &str| get(server.addr, &format!("/jobs/{id}"), &[]).json();
    server.wait_until("the first job's first step", |_| {
        status(&running)["progress"]["step"].as_u64() >= Some(1)
    });
    let waiting = status(&queued);
    assert_eq!(waiting["status"], "queued");
    assert_eq!(waiting["queue_position"], 0);

    let reply = send(server.addr, "DELETE", &format!("/jobs/{queued}"), &[], None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["status"], "cancelled");
    let events = job_events(server.addr, &queued, None);
    assert_eq!(events.last().unwrap().event, "cancelled");
    assert!(events.iter().all(|e| e.event != "step"), "it never ran");

    let reply = send(
        server.addr,
        "DELETE",
        &format!("/jobs/{running}"),
        &[],
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let events = job_events(server.addr, &running, None);
    assert_eq!(events.last().unwrap().event, "cancelled");
    assert!(events.iter().any(|e| e.event == "step"), "it had started");
    // The engine is free again: a small job runs to the end.
    let small = id_of(create_job(
        server.addr,
        &json!({"prompt": "a", "steps": 1, "width": 32, "height": 32}),
    ));
    assert_eq!(
        job_events(server.addr, &small, None).last().unwrap().event,
        "done"
    );
    let reply = send(server.addr, "DELETE", &format!("/jobs/{small}"), &[], None);
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert!(server.metric("sd21_jobs_total{outcome=\"cancelled\"}") >= 2.0);
    // The job cancelled while queued never started: two waits were measured.
    assert_eq!(server.metric("sd21_queue_wait_seconds_count"), 2.0);
}

/// `--max-batch 4`: jobs queued behind a running one share its next batch (the batch-size
/// histogram shows it; each job hears one step event per step, naming its first image), and
/// each image equals its request run alone afterwards (mean ≤ 0.25/255, max ≤ 2/255).
#[test]
fn queued_jobs_run_as_one_batch_and_each_image_equals_its_request_alone() {
    let server = Server::start(&["--max-batch", "4"]);
    let id_of = |reply: Reply| {
        assert_eq!(reply.status, 202, "{}", reply.text());
        reply.json()["id"].as_str().unwrap().to_string()
    };
    let blocker = id_of(create_job(server.addr, &slow_job()));
    server.wait_until("the blocker's first step", |s| {
        get(s.addr, &format!("/jobs/{blocker}"), &[]).json()["progress"]["step"].as_u64() >= Some(1)
    });
    let shared = json!({"width": 32, "height": 32, "steps": 3, "scheduler": "euler_a"});
    let with = |extra: Value| {
        let mut body = shared.clone();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let bodies = [
        with(json!({"prompt": "a red boat", "seed": 5, "number_of_images": 2})),
        with(json!({"prompt": "a cat", "negative_prompt": "blurry", "seed": 9, "cfg_scale": 1.0})),
        with(json!({"prompt": "a dog", "seed": 12, "cfg_scale": 4.0})),
    ];
    let ids: Vec<String> = bodies
        .iter()
        .map(|body| id_of(create_job(server.addr, body)))
        .collect();
    let reply = send(
        server.addr,
        "DELETE",
        &format!("/jobs/{blocker}"),
        &[],
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    for (id, body) in ids.iter().zip(&bodies) {
        let events = job_events(server.addr, id, None);
        assert_eq!(events.last().unwrap().event, "done", "{:?}", events.last());
        let steps = step_events(&events);
        assert_eq!(steps, [(0, 1), (0, 2), (0, 3)], "{body}");
        let status = get(server.addr, &format!("/jobs/{id}"), &[]).json();
        let alone = generate(server.addr, Some("application/json"), body).json();
        for (i, url) in status["images"].as_array().unwrap().iter().enumerate() {
            let batched = decode_png(&get(server.addr, url.as_str().unwrap(), &[]).body).2;
            let single = decode_png(&base64_png(&alone["images"][i])).2;
            let diffs: Vec<u8> = batched
                .iter()
                .zip(&single)
                .map(|(a, b)| a.abs_diff(*b))
                .collect();
            let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
            let max = diffs.iter().copied().max().unwrap_or(0);
            assert!(
                mean <= 0.25 && max <= 2,
                "{body} image {i}: mean {mean:.3}, max {max}"
            );
        }
    }
    // The blocker alone, the three jobs' four images together, then each request alone (the
    // first one's two images together).
    assert_eq!(server.metric("sd21_batch_images_count"), 2.0 + 3.0);
    assert_eq!(
        server.metric("sd21_batch_images_sum"),
        1.0 + 4.0 + (2.0 + 1.0 + 1.0)
    );
}

/// `--job-ttl`: a finished job is gone after it; `--max-stored-bytes`: the oldest finished job
/// goes when the next one's results do not fit.
#[test]
fn finished_jobs_expire_and_the_oldest_are_evicted() {
    let run = |server: &Server| {
        let body = json!({"prompt": "a", "steps": 1, "width": 32, "height": 32});
        let reply = create_job(server.addr, &body);
        assert_eq!(reply.status, 202, "{}", reply.text());
        let id = reply.json()["id"].as_str().unwrap().to_string();
        assert_eq!(
            job_events(server.addr, &id, None).last().unwrap().event,
            "done"
        );
        id
    };
    let server = Server::start(&["--job-ttl", "1"]);
    let id = run(&server);
    assert_eq!(get(server.addr, &format!("/jobs/{id}"), &[]).status, 200);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(get(server.addr, &format!("/jobs/{id}"), &[]).status, 404);
    drop(server);

    // One finished 32² job holds ~3 KB (a PNG and a few events): 5 KB keeps one.
    let server = Server::start(&["--max-stored-bytes", "5000"]);
    let first = run(&server);
    let second = run(&server);
    assert_eq!(get(server.addr, &format!("/jobs/{first}"), &[]).status, 404);
    assert_eq!(
        get(server.addr, &format!("/jobs/{second}"), &[]).status,
        200
    );
}

/// `--model demo`: no files, no download; the page, /ready and a job work, and the model says
/// its images are noise.
#[test]
fn the_demo_model_serves_the_page_and_the_api_offline() {
    let server = Server::start_model(std::path::Path::new("demo"), &[]);
    let ready = get(server.addr, "/ready", &[]).json();
    assert!(
        ready["model"].as_str().unwrap().contains("noise"),
        "{ready}"
    );
    let page = get(server.addr, "/", &[]);
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<title>sd21</title>"));
    let reply = create_job(server.addr, &json!({"prompt": "a", "steps": 2}));
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        job_events(server.addr, &id, None).last().unwrap().event,
        "done"
    );
    assert!(server.log().contains("its images are noise"));
}
