//! What a failed postcopy load does with its channels, seen from the source's end of a real
//! socket: a destination whose load fails lets go of its `postcopy-preempt` channel (shut down
//! both ways, its thread joined), instead of leaving a thread blocked on it — holding guest RAM
//! and the userfaultfd — until the source happens to close it.

use fuzz_harness::postcopy::{self, split};
use fuzz_harness::stream;
use migration::caps::{Capabilities, Capability};
use migration::incoming::StreamLoader;
use migration::machine::Reader;
use migration::params::Parameters;
use migration::transport::{connect, BoxRead, BoxWrite, Listener, MigrationUri};
use std::io::{Cursor, Read};
use std::path::Path;
use std::time::Duration;
use vm::MachineType;
use wire::StreamReader;

#[test]
fn a_failed_postcopy_load_closes_its_preempt_channel() {
    if let Some(why) = postcopy::userfaultfd_unavailable() {
        println!("skipped: no userfaultfd here: {why}");
        return;
    }
    let seed = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/seeds/postcopy/livemig-none-1m-ram-bitmap-preempt.mig"),
    )
    .expect("seed");
    let (main, _) = split(&seed);
    // Cut inside the pages pushed after RUN: the listen thread fails with pages missing.
    let main = &main[..main.len() - 1000];

    let path = std::env::temp_dir().join(format!("livemig-preempt-{}.sock", std::process::id()));
    let uri = MigrationUri::parse(&format!("unix:{}", path.display())).expect("uri");
    let listener = Listener::bind(&uri).expect("bind");
    let source = connect(&uri).expect("connect");
    let mut dest = listener.accept().expect("accept");

    let (vm, _layer, _events) = stream::destination(MachineType::None);
    let mut caps = Capabilities::default();
    caps.apply(&[
        (Capability::DirtyBitmaps, true),
        (Capability::PostcopyRam, true),
        (Capability::PostcopyPreempt, true),
    ])
    .expect("capabilities");
    let rp: BoxWrite = Box::new(std::io::sink());
    let mut loader = StreamLoader::new(vm.clone(), &caps, &Parameters::default(), Some(rp));
    loader.set_preempt_channel(dest.reader.take().expect("reader"), dest.shutdown.clone());
    let input: BoxRead = Box::new(Cursor::new(main.to_vec()));
    let mut r: Reader = StreamReader::new(input);
    let result = loader
        .load_header(&mut r)
        .and_then(|()| loader.load_body(&mut r));
    assert!(result.is_err(), "a cut stream loaded");
    assert!(loader.postcopy_ran(), "the cut is after RUN");

    // The source, which sent nothing on the preempt channel, sees it closed.
    source
        .shutdown
        .set_stall_timeout(true, false, Some(Duration::from_secs(3)));
    let mut reader = source.reader.expect("source's reader");
    let mut buf = [0u8; 16];
    match reader.read(&mut buf) {
        Ok(0) => {}
        other => panic!("the destination kept its preempt channel open: {other:?}"),
    }
    drop(loader);
    vm.shutdown();
    let _ = std::fs::remove_file(&path);
}
