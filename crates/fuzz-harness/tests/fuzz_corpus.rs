//! Replays the fuzz corpora through the same harnesses the cargo-fuzz targets run, so every
//! input the fuzzers kept — and every input that once crashed them — is checked by the
//! default test suite, invariants included.
//!
//! Two directories per target, under `fuzz/` at the workspace root:
//! - `seeds/<target>`: named inputs that are never minimized away — real streams captured from
//!   QEMU 7.2 and livemig, QMP sessions, and each input a fuzzer found a bug with;
//! - `corpus/<target>`: the minimized corpus the fuzzers grew (`fuzz/run.sh`).
//!
//! Besides "no invariant broken", the named real streams must load as a user expects.

use fuzz_harness::postcopy::{self, Variant};
use fuzz_harness::return_path::{self, Phase};
use fuzz_harness::{bitmaps, multifd, nbd_client, nbd_server, qmp, stream};
use migration::return_path::RpEvent;
use std::path::{Path, PathBuf};
use vm::MachineType;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Every file of `fuzz/<kind>/<target>`, sorted. The seeds must be there; a corpus not yet
/// grown is empty.
fn files(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    if kind == "corpus" && !dir.exists() {
        return Vec::new();
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn read(kind: &str, target: &str, name: &str) -> Vec<u8> {
    let p = fuzz_dir().join(kind).join(target).join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Runs `harness` on every seed and corpus file of `target`; returns how many ran.
fn replay(target: &str, harness: impl Fn(&[u8])) -> usize {
    replay_capped(target, usize::MAX, harness)
}

/// Runs `harness` on every seed of `target` and on at most `cap` of its corpus files, spread
/// evenly over the sorted list; returns how many ran.
fn replay_capped(target: &str, cap: usize, harness: impl Fn(&[u8])) -> usize {
    let mut n = 0;
    for kind in ["seeds", "corpus"] {
        let mut all = files(kind, target);
        if kind == "corpus" && all.len() > cap {
            let step = all.len().div_ceil(cap);
            all = all.into_iter().step_by(step).collect();
        }
        for p in all {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            // Printed before the run, so a failure names its input.
            println!("{}", p.display());
            harness(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn stream_loader_corpus_keeps_every_invariant() {
    let n = replay("stream_loader", |d| {
        stream::run(d);
    });
    assert!(n >= 7, "only {n} stream inputs");
}

/// Of the grown `postcopy` corpus, this many files are replayed (every seed is): each input
/// costs two destinations, a userfaultfd and a few threads (about 1 ms; the 910 files of the
/// corpus of 2026-12-06 replay in under a second), and a corpus that keeps growing must not
/// slow the whole suite down.
const POSTCOPY_CORPUS_CAP: usize = 1000;

/// Says once why the `postcopy-ram` destination is skipped, if it is.
fn note_userfaultfd() {
    if let Some(why) = postcopy::userfaultfd_unavailable() {
        println!("skipping the postcopy-ram destination (no userfaultfd here): {why}");
    }
}

#[test]
fn postcopy_corpus_keeps_every_invariant() {
    note_userfaultfd();
    let n = replay_capped("postcopy", POSTCOPY_CORPUS_CAP, |d| {
        postcopy::run(d);
    });
    assert!(n >= 6, "only {n} postcopy inputs");
}

#[test]
fn bitmap_section_corpus_keeps_every_invariant() {
    let n = replay("bitmap_section", |d| {
        bitmaps::run(d);
    });
    assert!(n >= 4, "only {n} bitmap inputs");
}

#[test]
fn qmp_corpus_keeps_every_invariant() {
    let n = replay("qmp", |d| {
        qmp::run(d);
    });
    assert!(n >= 13, "only {n} QMP inputs");
}

#[test]
fn qemu_stream_loads_into_none_with_its_bitmap() {
    let data = read("seeds", "stream_loader", "qemu-none-1m-zero-bitmap.mig");
    let none = stream::run_on(MachineType::None, &data);
    assert_eq!(none.result, Ok(()), "warnings: {:?}", none.warnings);
    assert_eq!(none.pages_loaded, 256);
    assert_eq!(none.bitmaps_created.len(), 1);
    let b = &none.bitmaps_created[0];
    assert_eq!(
        (b.node.as_str(), b.name.as_deref()),
        ("node0", Some("bitmap0"))
    );
    // Four 64 KiB granules written on the source: 0, 5, 16 and the one at 63 MiB.
    assert_eq!(
        (b.granularity, b.count, b.enabled),
        (65536, 4 * 65536, true)
    );

    let livemig = stream::run_on(MachineType::Livemig, &data);
    let err = livemig.result.expect_err("a `none` stream into -M livemig");
    assert!(err.contains("none"), "{err}");
}

#[test]
fn qemu_stream_with_pages_loads_two_bitmaps() {
    let data = read("seeds", "stream_loader", "qemu-none-1m-pages-2bitmaps.mig");
    let out = stream::run_on(MachineType::None, &data);
    assert_eq!(out.result, Ok(()), "warnings: {:?}", out.warnings);
    let mut names: Vec<_> = out
        .bitmaps_created
        .iter()
        .map(|b| (b.name.clone().unwrap_or_default(), b.enabled))
        .collect();
    names.sort();
    assert_eq!(names, [("bitmap0".into(), true), ("off".into(), false)]);
}

#[test]
fn livemig_stream_loads_into_livemig_only() {
    let data = read("seeds", "stream_loader", "livemig-livemig-1m-bitmap.mig");
    let outs = stream::run(&data);
    assert!(outs[0].result.is_err(), "a livemig-1.0 stream into -M none");
    let out = &outs[1];
    assert_eq!(out.result, Ok(()), "warnings: {:?}", out.warnings);
    assert_eq!(
        out.received_runstate,
        Some(migration::runstate::RunState::Running)
    );
    let mut names: Vec<_> = out
        .bitmaps_created
        .iter()
        .map(|b| (b.name.clone().unwrap_or_default(), b.granularity))
        .collect();
    names.sort();
    assert_eq!(names, [("bitmap0".into(), 65536), ("fine".into(), 512)]);
}

#[test]
fn qemu_4m_stream_fails_cleanly_on_a_1m_destination() {
    let data = read("seeds", "stream_loader", "none-4m-zero-bitmap.mig");
    let out = stream::run_on(MachineType::None, &data);
    assert!(out.result.is_err(), "4 MiB of RAM into 1 MiB");
    assert!(out.bitmaps_created.is_empty());
}

#[test]
fn bitmap_sections_cut_from_qemu_stream_load() {
    let data = read("seeds", "bitmap_section", "qemu-none-1m-zero-bitmap.bits");
    let out = bitmaps::run(&data);
    let plain = &out.plain;
    assert_eq!(plain.result, Ok(()), "warnings: {:?}", plain.warnings);
    assert_eq!(plain.sections, 2, "START and END section bodies");
    assert_eq!(plain.created.len(), 1);
    assert_eq!(plain.created[0].count, 4 * 65536);
    let mapped = &out.mapped;
    assert_eq!(mapped.result, Ok(()), "warnings: {:?}", mapped.warnings);
    let got: Vec<_> = mapped
        .created
        .iter()
        .map(|b| (b.node.as_str(), b.name.as_deref(), b.count))
        .collect();
    assert_eq!(got, [("node0", Some("b0"), 4 * 65536)]);
}

#[test]
fn mapped_bitmap_is_renamed_and_made_persistent() {
    let data = read("seeds", "bitmap_section", "livemig-none-1m-bitmaps.bits");
    let mapped = bitmaps::run(&data).mapped;
    assert_eq!(mapped.result, Ok(()), "warnings: {:?}", mapped.warnings);
    let mut got: Vec<_> = mapped
        .created
        .iter()
        .map(|b| (b.name.as_deref(), b.persistent, b.granularity))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [(Some("b0"), false, 65536), (Some("renamed"), true, 512)]
    );
    // `off` is not in the mapping: dropped with QEMU's message, the others carry on.
    assert!(
        mapped
            .warnings
            .iter()
            .any(|w| w.contains("Unknown bitmap alias 'off'")),
        "{:?}",
        mapped.warnings
    );
}

#[test]
fn qmp_session_answers_negotiation_and_queries() {
    let data = read("seeds", "qmp", "negotiate-then-query.json");
    let out = qmp::run(&data);
    let replies = out.replies.expect("session ran");
    assert_eq!(replies.len(), 4);
    assert!(
        replies.iter().all(|r| r.get("return").is_some()),
        "{replies:?}"
    );
    assert_eq!(replies[1]["id"], 1);
    assert_eq!(replies[1]["return"]["status"], "inmigrate");
}

#[test]
fn qmp_session_reports_errors_before_negotiation() {
    let data = read("seeds", "qmp", "before-negotiation.json");
    let replies = qmp::run(&data).replies.expect("session ran");
    assert_eq!(replies.len(), 2);
    assert_eq!(
        replies[0]["error"]["desc"],
        "Expecting capabilities negotiation with 'qmp_capabilities'"
    );
    assert!(replies[1].get("error").is_some(), "{:?}", replies[1]);
}

/// The `postcopy-ram` outcome of `out`, or `None` (said why) where there is no userfaultfd.
fn ram_outcome(out: &[postcopy::Outcome]) -> Option<&postcopy::Outcome> {
    note_userfaultfd();
    out.iter().find(|o| o.variant == Variant::Ram)
}

fn bitmap_only_outcome(out: &[postcopy::Outcome]) -> &postcopy::Outcome {
    out.iter()
        .find(|o| o.variant == Variant::BitmapOnly)
        .expect("the bitmap-only destination always runs")
}

#[test]
fn qemu_postcopy_stream_places_every_page() {
    let data = read("seeds", "postcopy", "qemu-none-1m-pages-ram-bitmap.mig");
    let out = postcopy::run(&data);
    let plain = bitmap_only_outcome(&out);
    let err = plain
        .result
        .as_ref()
        .expect_err("16-byte ADVISE without postcopy-ram");
    assert_eq!(err, "RAM postcopy is disabled but have 16 byte advise");
    let Some(o) = ram_outcome(&out) else { return };
    assert_eq!(o.result, Ok(()), "warnings: {:?}", o.warnings);
    assert!(o.postcopy_ran);
    assert_eq!(o.pages_received, 256);
    // Most of RAM was still dirty at the switch: discarded, then placed after LISTEN.
    assert!(o.pages_placed > 200, "{o:?}");
    assert_eq!(o.bitmaps_created.len(), 1);
    assert_eq!(o.bitmaps_created[0].count, 4 * 65536);
}

#[test]
fn bitmap_only_postcopy_streams_need_postcopy_ram_off() {
    for name in [
        "qemu-none-1m-bitmap-only-2bitmaps.mig",
        "livemig-none-1m-bitmap-only-2bitmaps.mig",
    ] {
        let out = postcopy::run(&read("seeds", "postcopy", name));
        let o = bitmap_only_outcome(&out);
        assert_eq!(o.result, Ok(()), "{name}: warnings: {:?}", o.warnings);
        assert!(o.postcopy_ran, "{name}");
        assert_eq!(o.bitmaps_created.len(), 2, "{name}");
        if let Some(r) = ram_outcome(&out) {
            assert_eq!(
                r.result,
                Err("RAM postcopy is enabled but have 0 byte advise".into()),
                "{name}"
            );
        }
    }
}

#[test]
fn preempt_channel_pages_are_placed() {
    for name in [
        "qemu-none-1m-pages-ram-preempt-pages.mig",
        "livemig-none-1m-ram-bitmap-preempt-pages.mig",
    ] {
        let out = postcopy::run(&read("seeds", "postcopy", name));
        let Some(o) = ram_outcome(&out) else { return };
        assert_eq!(o.result, Ok(()), "{name}: warnings: {:?}", o.warnings);
        assert_eq!(o.preempt_pages, 3, "{name}");
        assert_eq!(o.pages_received, 256, "{name}");
    }
}

#[test]
fn postcopy_stream_cut_after_run_fails_cleanly() {
    let data = read("seeds", "postcopy", "qemu-none-1m-pages-ram-bitmap.mig");
    // Cut inside the pages pushed after RUN: the listen thread hits the end of the channel
    // with pages still missing.
    let cut = &data[..data.len() - 4000];
    let out = postcopy::run(cut);
    let Some(o) = ram_outcome(&out) else { return };
    assert!(o.result.is_err(), "{o:?}");
    assert!(o.postcopy_ran);
    assert!(o.pages_received < 256, "{o:?}");
    assert!(o.bitmaps_created.is_empty());
}

#[test]
fn return_path_corpus_keeps_every_invariant() {
    let n = replay("return_path", |d| {
        return_path::run(d);
    });
    assert!(n >= 13, "only {n} return-path inputs");
}

fn phase(out: &[return_path::Outcome], p: Phase) -> &return_path::Outcome {
    out.iter().find(|o| o.phase == p).expect("every phase runs")
}

#[test]
fn qemu_return_path_is_pongs_then_shut() {
    let out = return_path::run(&read("seeds", "return_path", "qemu-none-1m-postcopy.rp"));
    let pre = phase(&out, Phase::Precopy);
    assert_eq!(pre.events, [RpEvent::Shut(0)]);
    assert_eq!(
        pre.last_answer, None,
        "QEMU's postcopy PINGs are not the backlog's"
    );
    let post = phase(&out, Phase::Postcopy);
    assert_eq!(
        post.result,
        Err("the destination ended the migration (SHUT 0) during postcopy".into())
    );
}

#[test]
fn livemig_backlog_pongs_are_recorded() {
    let out = return_path::run(&read(
        "seeds",
        "return_path",
        "livemig-to-qemu-postcopy-preempt.rp",
    ));
    assert_eq!(phase(&out, Phase::Precopy).last_answer, Some(0x8000_0003));
}

#[test]
fn requested_pages_are_sent_once_on_either_channel() {
    let out = return_path::run(&read("seeds", "return_path", "postcopy-requests.rp"));
    // 2 + 1 + 1 pages of `ram`, 1 of `rom`, the last page of `ram`; page 0 went in precopy.
    for p in [Phase::Postcopy, Phase::Preempt] {
        let o = phase(&out, p);
        assert_eq!(o.pages_sent, 6, "{p:?}: {o:?}");
        assert_eq!(o.events.last(), Some(&RpEvent::Shut(0)), "{p:?}");
    }
    let pre = phase(&out, Phase::Precopy);
    assert_eq!(
        pre.events,
        [RpEvent::Failed("RP: page request before postcopy".into())]
    );
}

#[test]
fn recovery_takes_received_maps_then_resume_ack() {
    let out = return_path::run(&read("seeds", "return_path", "recovery.rp"));
    let o = phase(&out, Phase::Recovery);
    assert_eq!(o.result, Ok(()), "{o:?}");
    assert_eq!(o.recovered, (2, true));
    let bad = return_path::run(&read("seeds", "return_path", "recovery-bad-size.rp"));
    let o = phase(&bad, Phase::Recovery);
    let err = o.result.as_ref().expect_err("a map of 128 pages for 256");
    assert!(err.contains("bitmap size mismatch"), "{err}");
}

#[test]
fn bad_requests_fail_with_qemus_words() {
    for (name, want) in [
        (
            "request-unknown-block.rp",
            "migrate_handle_rp_req_pages: invalid block name 'pc.ram'",
        ),
        (
            "request-misaligned.rp",
            "migrate_handle_rp_req_pages: Misaligned page request, start: 800 len: 4096",
        ),
        (
            "request-overrun.rp",
            "ram_save_queue_pages request overrun, start=ff000 len=2000 blen=100000",
        ),
    ] {
        let out = return_path::run(&read("seeds", "return_path", name));
        for p in [Phase::Postcopy, Phase::Preempt] {
            let o = phase(&out, p);
            assert_eq!(o.result, Err(want.to_string()), "{name} {p:?}");
            assert_eq!(o.pages_sent, 0, "{name} {p:?}");
        }
    }
}

#[test]
fn multifd_corpus_keeps_every_invariant() {
    let n = replay("multifd", |d| {
        multifd::run(d);
    });
    assert!(n >= 6, "only {n} multifd inputs");
}

#[test]
fn qemu_multifd_channels_load_their_pages() {
    // QEMU 7.2's source: a non-zero page every 0x5000 bytes (52 of them), over two channels,
    // compressed; one sync round per RAM section of the stream (setup, one pass, complete).
    for name in ["qemu-none-1m-2ch-zlib.mfd", "qemu-none-1m-2ch-zstd.mfd"] {
        let out = multifd::run(&read("seeds", "multifd", name));
        assert_eq!(out.accept, Ok(()), "{name}");
        assert_eq!(out.channel_error, None, "{name}");
        assert_eq!(out.pages, 52, "{name}");
        assert_eq!(out.pages_written, 52, "{name}");
        assert!(out.rounds >= 2, "{name}: {out:?}");
    }
    let out = multifd::run(&read("seeds", "multifd", "qemu-none-1m-2ch-none.mfd"));
    assert_eq!((out.pages, out.pages_written), (4, 4), "{out:?}");
}

#[test]
fn a_missing_multifd_channel_fails_the_accept() {
    let data = read("seeds", "multifd", "qemu-to-livemig-none-1m-4ch-zstd.mfd");
    let (compression, channels, parts) = multifd::split(&data);
    assert_eq!(
        (compression, channels, parts.len()),
        (migration::multifd::Compression::Zstd, 4, 4)
    );
    let three: Vec<Vec<u8>> = parts[..3].iter().map(|p| p.to_vec()).collect();
    let mut cut = multifd::join(compression, &three);
    // Still four channels announced.
    cut[0] |= 3 << 2;
    let out = multifd::run(&cut);
    let e = out.accept.expect_err("three channels of four");
    assert!(e.starts_with("multifd: the main channel closed"), "{e}");
}

#[test]
fn nbd_client_corpus_keeps_every_invariant() {
    let n = replay("nbd_client", |d| {
        nbd_client::run(d);
    });
    assert!(n >= 4, "only {n} NBD client inputs");
}

#[test]
fn qemu_nbd_replies_serve_every_request() {
    for (name, extents, sent) in [
        // read, read, write, write-zeroes, trim, flush, DISC
        ("qemu-nbd-plain.nbd", 0, 7),
        ("qemu-nbd-meta-allocation.nbd", 5, 8),
        ("qemu-nbd-meta-bitmap.nbd", 3, 8),
        // A read-only export: no writes are sent (the client refuses them itself).
        ("qemu-nbd-read-only.nbd", 0, 4),
    ] {
        let out = nbd_client::run(&read("seeds", "nbd_client", name));
        assert_eq!(out.connected, Ok(()), "{name}");
        assert_eq!(out.size, 1 << 20, "{name}");
        assert_eq!(out.extents, extents, "{name}: {out:?}");
        assert_eq!(out.sent, sent, "{name}: {out:?}");
        let failed: Vec<_> = out.requests.iter().filter(|r| r.is_err()).collect();
        if name.contains("read-only") {
            assert_eq!(failed.len(), 3, "{name}: {out:?}");
        } else {
            assert!(failed.is_empty(), "{name}: {out:?}");
        }
    }
}

#[test]
fn nbd_server_corpus_keeps_every_invariant() {
    let n = replay("nbd_server", |d| {
        nbd_server::run(d);
    });
    assert!(n >= 25, "only {n} NBD server inputs");
}

/// The offsets `extents` (from `at`) say are dirty, as ranges.
fn dirty_ranges(at: u64, extents: &[(u32, u32)]) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    let mut pos = at;
    for (len, flags) in extents {
        if flags & nbd::proto::state::DIRTY != 0 {
            v.push((pos, pos + u64::from(*len)));
        }
        pos += u64::from(*len);
    }
    v
}

#[test]
fn qemu_nbd_list_sees_both_exports() {
    let out = nbd_server::run(&read("seeds", "nbd_server", "qemu-nbd-list.nbd"));
    assert_eq!(
        out.listed,
        ["ro", "node0"],
        "newest first, as QEMU lists them"
    );
    assert_eq!(out.export, None, "--list only looks");
    assert_eq!(out.result, Ok(()));
}

#[test]
fn qemu_img_map_reads_the_exported_dirty_bitmaps() {
    // b0: the granules of node0 written before the export (64 KiB each, at 0, 320k, 768k).
    let out = nbd_server::run(&read(
        "seeds",
        "nbd_server",
        "qemu-img-map-dirty-bitmap-b0.nbd",
    ));
    assert_eq!(out.export.as_deref(), Some("node0"));
    let mut dirty = Vec::new();
    for st in &out.extents {
        assert_eq!(st.context, "qemu:dirty-bitmap:b0", "{out:?}");
        dirty.extend(dirty_ranges(st.offset, &st.extents));
    }
    assert!(!dirty.is_empty(), "{out:?}");
    assert_eq!(
        dirty,
        [
            (0, 64 << 10),
            (320 << 10, 384 << 10),
            (768 << 10, 832 << 10)
        ]
    );
    // b1 on the read-only export: 4 KiB granules 1, 2, 100, 255.
    let out = nbd_server::run(&read(
        "seeds",
        "nbd_server",
        "qemu-img-map-dirty-bitmap-b1.nbd",
    ));
    assert_eq!(out.export.as_deref(), Some("ro"));
    let mut dirty = Vec::new();
    for st in &out.extents {
        assert_eq!(st.context, "qemu:dirty-bitmap:b1", "{out:?}");
        dirty.extend(dirty_ranges(st.offset, &st.extents));
    }
    assert_eq!(
        dirty,
        [
            (4096, 3 * 4096),
            (100 * 4096, 101 * 4096),
            (255 * 4096, 256 * 4096)
        ]
    );
}

#[test]
fn qemu_drive_mirror_writes_the_whole_export() {
    let out = nbd_server::run(&read("seeds", "nbd_server", "qemu-drive-mirror.nbd"));
    assert_eq!(out.export.as_deref(), Some("node0"));
    assert!(out.structured);
    assert_eq!(out.result, Ok(()));
    let kinds = |k: u16| out.requests.iter().filter(|(kind, _)| *kind == k).count();
    use nbd::proto::cmd;
    assert!(
        kinds(cmd::WRITE) >= 3 && kinds(cmd::WRITE_ZEROES) >= 1,
        "{:?}",
        out.requests
    );
    assert!(
        out.requests.iter().all(|(_, e)| *e == 0),
        "{:?}",
        out.requests
    );
}

#[test]
fn qemu_io_session_is_answered_in_full() {
    for (name, export, min) in [
        ("qemu-io-rw.nbd", "node0", 9),
        ("qemu-io-ro.nbd", "ro", 2),
        ("qemu-img-convert-to.nbd", "node0", 3),
    ] {
        let out = nbd_server::run(&read("seeds", "nbd_server", name));
        assert_eq!(out.export.as_deref(), Some(export), "{name}");
        assert_eq!(out.result, Ok(()), "{name}");
        assert!(out.requests.len() >= min, "{name}: {:?}", out.requests);
        assert!(
            out.requests.iter().all(|(_, e)| *e == 0),
            "{name}: {:?}",
            out.requests
        );
    }
}

#[test]
fn refused_requests_get_qemus_errors() {
    use nbd::proto::{cmd, err};
    let out = nbd_server::run(&read("seeds", "nbd_server", "bitmap-on-ro.nbd"));
    assert_eq!(
        out.requests,
        [
            (cmd::BLOCK_STATUS, 0),
            (cmd::BLOCK_STATUS, 0),
            (cmd::TRIM, err::EPERM),
            (cmd::WRITE_ZEROES, err::EPERM),
            (cmd::WRITE, err::EPERM)
        ]
    );
    let out = nbd_server::run(&read("seeds", "nbd_server", "flush-past-the-end.nbd"));
    assert_eq!(out.requests.last(), Some(&(cmd::FLUSH, err::EINVAL)));
}

#[test]
fn a_tls_server_refuses_every_option_before_starttls() {
    use nbd::proto::{opt, rep};
    let out = nbd_server::run(&read("seeds", "nbd_server", "before-tls-abort.nbd"));
    assert_eq!(
        out.tls,
        [
            (opt::GO, rep::ERR_TLS_REQD),
            (opt::STRUCTURED_REPLY, rep::ERR_TLS_REQD),
            (opt::LIST, rep::ERR_TLS_REQD),
            (opt::ABORT, rep::ERR_TLS_REQD)
        ]
    );
    // The same options to the plain server: GO enters transmission.
    assert_eq!(out.export.as_deref(), Some("node0"));
    let out = nbd_server::run(&read("seeds", "nbd_server", "options-then-abort.nbd"));
    assert_eq!(
        out.tls,
        [
            (opt::LIST, rep::ERR_TLS_REQD),
            (opt::LIST, rep::ERR_TLS_REQD),
            (opt::STARTTLS, rep::ACK)
        ]
    );
}
