//! Property tests: every codec round-trips, and no input — random bytes or a damaged real
//! stream — makes a decoder or the analyzer panic.

use proptest::prelude::*;
use wire::bitmap::{read_chunk, write_chunk, BitsData, Chunk, ChunkPayload};
use wire::command::{read_command, write_command, DiscardRange, PostcopyAdvise};
use wire::config::{read_configuration, write_configuration, Configuration};
use wire::ram::{
    read_mem_block, read_ram_record, write_mem_block, write_ram_record, MemBlock, MemBlockFields,
    RamRecord,
};
use wire::return_path::{read_rp_message, write_rp_message, RpMessage};
use wire::{Command, StreamReader, StreamWriter};

fn name() -> impl Strategy<Value = String> + Clone {
    "[a-zA-Z0-9./_:-]{1,40}"
}

fn long_name() -> impl Strategy<Value = String> + Clone {
    prop_oneof![name(), "[a-z]{200,255}"]
}

fn page_offset() -> impl Strategy<Value = u64> {
    (0u64..(1 << 40)).prop_map(|p| p * 4096)
}

fn ram_record() -> impl Strategy<Value = RamRecord> {
    let block = proptest::option::of(long_name());
    prop_oneof![
        page_offset().prop_map(|total| RamRecord::MemSize { total }),
        (block.clone(), page_offset(), any::<u8>()).prop_map(|(block, offset, fill)| {
            RamRecord::Zero {
                block,
                offset,
                fill,
            }
        }),
        (block.clone(), page_offset())
            .prop_map(|(block, offset)| RamRecord::Page { block, offset }),
        (block.clone(), page_offset(), 0u16..=4096)
            .prop_map(|(block, offset, len)| RamRecord::Xbzrle { block, offset, len }),
        (block, page_offset(), 0u32..=4110)
            .prop_map(|(block, offset, len)| RamRecord::CompressPage { block, offset, len }),
        Just(RamRecord::MultifdFlush),
        Just(RamRecord::Eos),
        page_offset().prop_map(|offset| RamRecord::Hook { offset }),
    ]
}

fn chunk() -> impl Strategy<Value = Chunk> {
    let data = prop_oneof![
        Just(BitsData::Zeroes),
        proptest::collection::vec(any::<u8>(), 0..2048).prop_map(BitsData::Buffer),
    ];
    let payload = prop_oneof![
        (any::<u32>(), any::<u8>())
            .prop_map(|(granularity, flags)| ChunkPayload::Start { granularity, flags }),
        (any::<u64>(), any::<u32>(), data).prop_map(|(start_sector, nr_sectors, data)| {
            ChunkPayload::Bits {
                start_sector,
                nr_sectors,
                data,
            }
        }),
        Just(ChunkPayload::Complete),
        Just(ChunkPayload::None),
    ];
    (
        proptest::option::of(long_name()),
        proptest::option::of(long_name()),
        payload,
        any::<bool>(),
    )
        .prop_map(|(node, bitmap, payload, eos)| Chunk {
            node,
            bitmap,
            payload,
            eos,
        })
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        Just(Command::OpenReturnPath),
        any::<u32>().prop_map(Command::Ping),
        proptest::option::of((any::<u64>(), any::<u64>())).prop_map(|a| Command::PostcopyAdvise(
            a.map(|(s, t)| PostcopyAdvise {
                ram_pagesize_summary: s,
                target_page_size: t
            })
        )),
        Just(Command::PostcopyListen),
        Just(Command::PostcopyRun),
        (
            long_name(),
            proptest::collection::vec((any::<u64>(), any::<u64>()), 1..12)
        )
            .prop_map(|(ramblock, r)| {
                Command::PostcopyRamDiscard {
                    ramblock,
                    ranges: r
                        .into_iter()
                        .map(|(start, length)| DiscardRange { start, length })
                        .collect(),
                }
            }),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Command::Packaged),
        Just(Command::EnableColo),
        Just(Command::PostcopyResume),
        long_name().prop_map(|ramblock| Command::RecvBitmap { ramblock }),
        Just(Command::SwitchoverStart),
    ]
}

fn rp_message() -> impl Strategy<Value = RpMessage> {
    prop_oneof![
        any::<u32>().prop_map(RpMessage::Shut),
        any::<u32>().prop_map(RpMessage::Pong),
        (any::<u64>(), any::<u32>(), long_name()).prop_map(|(start, len, ramblock)| {
            RpMessage::ReqPagesId {
                start,
                len,
                ramblock,
            }
        }),
        (any::<u64>(), any::<u32>()).prop_map(|(start, len)| RpMessage::ReqPages { start, len }),
        long_name().prop_map(|ramblock| RpMessage::RecvBitmap { ramblock }),
        any::<u32>().prop_map(RpMessage::ResumeAck),
        Just(RpMessage::SwitchoverAck),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn ram_records_round_trip(recs in proptest::collection::vec(ram_record(), 1..20)) {
        let mut w = StreamWriter::new(Vec::new());
        for r in &recs {
            write_ram_record(&mut w, r).unwrap();
            w.put_bytes(&vec![0xA5; r.payload_len() as usize]).unwrap();
        }
        let bytes = w.into_inner().unwrap();
        let mut rd = StreamReader::new(&bytes[..]);
        for r in &recs {
            prop_assert_eq!(&read_ram_record(&mut rd).unwrap(), r);
            rd.skip(r.payload_len()).unwrap();
        }
        prop_assert!(rd.is_at_eof().unwrap());
    }

    #[test]
    fn mem_blocks_round_trip(n in long_name(), len in any::<u64>(), ps in proptest::option::of(any::<u64>()), addr in proptest::option::of(any::<u64>())) {
        let b = MemBlock { name: n, used_length: len, page_size: ps, addr };
        let mut w = StreamWriter::new(Vec::new());
        write_mem_block(&mut w, &b).unwrap();
        let bytes = w.into_inner().unwrap();
        let f = MemBlockFields { page_size: ps.is_some(), addr: addr.is_some() };
        prop_assert_eq!(read_mem_block(&mut StreamReader::new(&bytes[..]), |_| f).unwrap(), b);
    }

    #[test]
    fn chunks_round_trip(chunks in proptest::collection::vec(chunk(), 1..8)) {
        let mut w = StreamWriter::new(Vec::new());
        for c in &chunks {
            write_chunk(&mut w, c).unwrap();
        }
        let bytes = w.into_inner().unwrap();
        let mut r = StreamReader::new(&bytes[..]).with_options(wire::ReaderOptions { max_bitmap_buffer: 4096, ..Default::default() });
        for c in &chunks {
            prop_assert_eq!(&read_chunk(&mut r).unwrap(), c);
        }
        prop_assert!(r.is_at_eof().unwrap());
    }

    #[test]
    fn commands_round_trip(cmds in proptest::collection::vec(command(), 1..6)) {
        let mut w = StreamWriter::new(Vec::new());
        for c in &cmds {
            write_command(&mut w, c).unwrap();
        }
        let bytes = w.into_inner().unwrap();
        let mut r = StreamReader::new(&bytes[..]);
        for c in &cmds {
            prop_assert_eq!(r.u8().unwrap(), 8);
            prop_assert_eq!(&read_command(&mut r).unwrap(), c);
        }
    }

    #[test]
    fn rp_messages_round_trip(ms in proptest::collection::vec(rp_message(), 1..6)) {
        let mut w = StreamWriter::new(Vec::new());
        for m in &ms {
            write_rp_message(&mut w, m).unwrap();
        }
        let bytes = w.into_inner().unwrap();
        let mut r = StreamReader::new(&bytes[..]);
        for m in &ms {
            prop_assert_eq!(&read_rp_message(&mut r).unwrap(), m);
        }
    }

    #[test]
    fn configuration_round_trips(machine in "[a-z0-9.-]{0,40}", bits in proptest::option::of(any::<u32>()),
                                 caps in proptest::option::of(proptest::collection::vec("[a-z-]{0,30}", 0..4)),
                                 uuid in proptest::option::of(any::<[u8; 16]>())) {
        let cfg = Configuration { machine, target_page_bits: bits, capabilities: caps, uuid };
        let mut w = StreamWriter::new(Vec::new());
        write_configuration(&mut w, &cfg).unwrap();
        let bytes = w.into_inner().unwrap();
        prop_assert_eq!(read_configuration(&mut StreamReader::new(&bytes[..])).unwrap(), cfg);
    }

    #[test]
    fn decoders_never_panic_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_ram_record(&mut StreamReader::new(&bytes[..]));
        let _ = read_chunk(&mut StreamReader::new(&bytes[..]));
        let _ = read_command(&mut StreamReader::new(&bytes[..]));
        let _ = read_rp_message(&mut StreamReader::new(&bytes[..]));
        let _ = read_configuration(&mut StreamReader::new(&bytes[..]));
        let _ = wire::section::read_item(&mut StreamReader::new(&bytes[..]));
        let _ = wire::section::read_vmdesc(&mut StreamReader::new(&bytes[..]));
    }
}

fn capture() -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/data/none-4m-pages-bitmap.mig",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

fn apply(data: &mut Vec<u8>, m: &Mutation) {
    if data.is_empty() {
        return;
    }
    match m {
        Mutation::Flip(i, x) => {
            let i = i % data.len();
            data[i] ^= x;
        }
        Mutation::Truncate(i) => data.truncate(i % data.len()),
        Mutation::Insert(i, v) => {
            let i = i % data.len();
            data.splice(i..i, v.iter().copied());
        }
        Mutation::Remove(i, n) => {
            let i = i % data.len();
            let end = (i + n).min(data.len());
            data.drain(i..end);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn analyzer_never_panics_on_random_bytes(mut bytes in proptest::collection::vec(any::<u8>(), 0..2048), header in any::<bool>()) {
        if header {
            // Give the random tail a chance to get past the header and configuration.
            let mut v = b"QEVM\0\0\0\x03\x07\0\0\0\x04none".to_vec();
            v.append(&mut bytes);
            bytes = v;
        }
        let a = wire::analyze(&bytes[..]);
        let _ = a.to_string();
        let _ = a.to_json();
        if let Some(e) = &a.error {
            prop_assert!(e.offset <= bytes.len() as u64);
        }
    }

    #[test]
    fn analyzer_never_panics_on_damaged_capture(ms in proptest::collection::vec(mutation(), 1..4)) {
        let mut data = capture();
        for m in &ms {
            apply(&mut data, m);
        }
        let a = wire::analyze(&data[..]);
        let _ = a.to_string();
        let _ = a.to_json();
        if let Some(e) = &a.error {
            prop_assert!(e.offset <= data.len() as u64, "{} > {}", e.offset, data.len());
        }
    }

    #[test]
    fn truncated_capture_reports_truncation(cut in 0usize..22_000) {
        let data = capture();
        let a = wire::analyze(&data[..cut]);
        let e = a.error.expect("a cut stream is an error");
        prop_assert!(e.is_truncated(), "{}", e);
        prop_assert!(e.offset <= cut as u64);
        prop_assert!(!a.summary.eof);
    }
}
