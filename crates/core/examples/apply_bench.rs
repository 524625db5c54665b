//! Times `apply_tar` on a tar file: `cargo run --release --example apply_bench -- LAYER.tar DEST`.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let f = std::fs::File::open(&args[1]).expect("tar");
    let dest = std::path::Path::new(&args[2]);
    std::fs::create_dir_all(dest).unwrap();
    let t = std::time::Instant::now();
    let s = sharedloop_core::apply::apply_tar(std::io::BufReader::with_capacity(1 << 20, f), dest).unwrap();
    eprintln!("applied {} entries, {} bytes in {:?}", s.entries, s.tar_bytes, t.elapsed());
}
