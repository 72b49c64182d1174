//! Records the rustls version of the build (from Cargo.lock) for
//! `postconf -T compile-version`.

fn main() {
    let lock = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock");
    println!("cargo:rerun-if-changed={lock}");
    let text = std::fs::read_to_string(lock).unwrap_or_default();
    let mut lines = text.lines();
    let mut version = "unknown".to_string();
    while let Some(l) = lines.next() {
        if l == "name = \"rustls\"" {
            if let Some(v) = lines
                .next()
                .and_then(|v| v.strip_prefix("version = \""))
                .and_then(|v| v.strip_suffix('"'))
            {
                version = v.to_string();
            }
            break;
        }
    }
    println!("cargo:rustc-env=POSTERN_RUSTLS_VERSION={version}");
}
