//! The web page (`GET /`) in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`) driven through chromedriver against `sd21 serve` with the tiny model:
//! type a prompt, generate, watch the progress and the final image, cancel a long job.
//! Skipped with a message where chromedriver is missing, unless SD21_REQUIRE_BROWSER=1 (CI).

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sd21 serve` with the tiny model; its address once it says where it listens and is ready.
fn serve() -> (Killed, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sd21"))
        .args(["serve", "--model"])
        .arg(common::tiny_model())
        .args(["--host", "127.0.0.1", "--port", "0"])
        .env("NO_COLOR", "1")
        .env_remove("SD21_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sd21 serve");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line.expect("server log");
        if let Some(found) = sd21::server::listening_address(&line) {
            addr = Some(found);
        }
        if line.contains("ready") && addr.is_some() {
            break;
        }
    }
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let addr = addr.expect("the server never said where it listens");
    (Killed(child), format!("http://{addr}"))
}

/// chromedriver on a free loopback port.
fn chromedriver() -> (Killed, String) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chromedriver");
    let end = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Killed(child), format!("http://127.0.0.1:{port}"))
}

async fn browser(webdriver: &str) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({"binary": CHROMIUM,
               "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--window-size=1200,860"]}),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(webdriver)
        .await
        .expect("a Chromium session")
}

/// Polls the text of `#id` every 50 ms until `ok` holds (2 minutes at most).
async fn wait_text(page: &Client, id: &str, ok: impl Fn(&str) -> bool) -> String {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let text = page
            .find(Locator::Id(id))
            .await
            .expect("element")
            .text()
            .await
            .unwrap_or_default();
        if ok(&text) {
            return text;
        }
        assert!(Instant::now() < end, "#{id} stayed at {text:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Types each `(id, value)` into its input, replacing what was there.
async fn fill(page: &Client, fields: &[(&str, &str)]) {
    for (id, value) in fields {
        let input = page.find(Locator::Id(id)).await.expect("input");
        input.clear().await.expect("clear");
        input.send_keys(value).await.expect("type");
    }
}

async fn click(page: &Client, id: &str) {
    let button = page.find(Locator::Id(id)).await.expect("button");
    button.click().await.expect("click");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_generates_shows_progress_and_cancels_in_chromium() {
    if !std::path::Path::new(CHROMEDRIVER).exists() {
        assert!(
            sd21::env::flag("SD21_REQUIRE_BROWSER") != Some(true),
            "SD21_REQUIRE_BROWSER=1 but {CHROMEDRIVER} is missing"
        );
        eprintln!("skipped: no {CHROMEDRIVER} (apt-get install chromium chromium-driver)");
        return;
    }
    let (_server, url) = serve();
    let (_driver, webdriver) = chromedriver();
    let page = browser(&webdriver).await;
    page.goto(&url).await.expect("open the page");
    wait_text(&page, "model", |t| t.contains("tiny-sd21")).await;

    // Generate: the progress moves, the image lands in the gallery.
    let first = [
        ("prompt", "a red boat"),
        ("steps", "3"),
        ("width", "32"),
        ("height", "32"),
        ("seed", "5"),
    ];
    fill(&page, &first).await;
    click(&page, "generate").await;
    let status = wait_text(&page, "status", |t| {
        t.starts_with("Done") || t.starts_with("Error")
    })
    .await;
    assert!(status.starts_with("Done"), "{status}");
    let progress = page
        .execute("return document.getElementById('progress').value;", vec![])
        .await
        .unwrap();
    assert_eq!(progress, json!(1));
    let end = Instant::now() + Duration::from_secs(30);
    let size = loop {
        let size = page
            .execute(
                "const img = document.querySelector('#gallery img');
                 return img && img.complete && img.naturalWidth ? [img.naturalWidth, img.naturalHeight] : null;",
                vec![],
            )
            .await
            .unwrap();
        if !size.is_null() || Instant::now() >= end {
            break size;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        size,
        json!([32, 32]),
        "the generated image is in the gallery"
    );
    let caption = page
        .find(Locator::Css("#gallery figcaption"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(caption.contains("seed 5"), "{caption}");
    if let Ok(path) = std::env::var("SD21_PAGE_SCREENSHOT") {
        std::fs::write(&path, page.screenshot().await.unwrap()).unwrap();
        eprintln!("screenshot: {path}");
    }

    // A long job: progress shows, Cancel stops it.
    let long = [
        ("steps", "150"),
        ("width", "64"),
        ("height", "64"),
        ("number_of_images", "8"),
    ];
    fill(&page, &long).await;
    click(&page, "generate").await;
    wait_text(&page, "status", |t| t.starts_with("Image")).await;
    click(&page, "cancel").await;
    let status = wait_text(&page, "status", |t| {
        t == "Cancelled." || t.starts_with("Done")
    })
    .await;
    assert_eq!(status, "Cancelled.");
    page.close().await.unwrap();
}
