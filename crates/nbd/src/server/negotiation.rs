//! Fixed newstyle negotiation: the handshake, the options (`LIST`, `INFO`/`GO`,
//! `EXPORT_NAME`, `STRUCTURED_REPLY`, `*_META_CONTEXT`, `STARTTLS`, `ABORT`) and QEMU's
//! replies and errors for each, up to the export a client goes on to transmission with.

use super::{
    lock, Conn, Export, NbdServer, MAX_META_QUERIES, META_ID_BASE_ALLOCATION, META_ID_DIRTY_BITMAP,
};
use crate::proto::{self, info, opt, rep, Cursor, ProtoError};
use std::io::{BufReader, BufWriter};
use std::os::fd::AsFd;
use std::sync::Arc;

/// What a client negotiated before transmission.
#[derive(Default)]
pub(super) struct Negotiated {
    pub(super) structured: bool,
    pub(super) no_zeroes: bool,
    /// Export the meta contexts were selected for, and the selection.
    pub(super) meta_export: Option<String>,
    pub(super) base_allocation: bool,
    pub(super) dirty_bitmap: bool,
}

/// Fixed newstyle negotiation. `Ok(None)`: the client went away cleanly (ABORT, or it only
/// listed exports).
pub(super) fn negotiate(
    server: &NbdServer,
    c: &mut Conn,
) -> Result<Option<(Arc<Export>, Negotiated)>, ProtoError> {
    c.put(&proto::NBDMAGIC.to_be_bytes())?;
    c.put(&proto::IHAVEOPT.to_be_bytes())?;
    c.put(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes())?;
    c.flush()?;
    let cflags = proto::read_u32(&mut c.r, "client flags")?;
    if cflags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::Protocol(format!(
            "Unknown client flags 0x{:x} received",
            cflags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
        )));
    }
    let fixed = cflags & proto::FLAG_C_FIXED_NEWSTYLE != 0;
    let mut neg = Negotiated {
        no_zeroes: cflags & proto::FLAG_C_NO_ZEROES != 0,
        ..Default::default()
    };
    loop {
        let magic = proto::read_u64(&mut c.r, "option magic")?;
        if magic != proto::IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "option",
                got: magic,
                expected: proto::IHAVEOPT,
            });
        }
        let option = proto::read_u32(&mut c.r, "option")?;
        let len = proto::read_u32(&mut c.r, "option length")?;
        if len > proto::MAX_OPTION_LENGTH {
            return Err(ProtoError::TooLong {
                what: "option payload",
                len: u64::from(len),
                limit: u64::from(proto::MAX_OPTION_LENGTH),
            });
        }
        let data = proto::read_vec(
            &mut c.r,
            u64::from(len),
            u64::from(proto::MAX_OPTION_LENGTH),
            "option payload",
        )?;
        if !fixed && option != opt::EXPORT_NAME {
            return Err(ProtoError::Protocol(format!(
                "Unsupported option {option} ({}) before fixed newstyle",
                opt::name(option)
            )));
        }
        let tls = lock(&server.inner.tls).clone();
        if let (Some((creds, authz)), false) = (&tls, c.tls) {
            // QEMU's rules before TLS: STARTTLS, or ABORT, or nothing.
            match option {
                opt::STARTTLS if !data.is_empty() => {
                    return Err(ProtoError::Protocol(unexpected_length(option)));
                }
                opt::STARTTLS => {
                    c.option_error(option, rep::ACK, "")?;
                    start_tls(server, c, creds, authz.as_deref())?;
                }
                opt::EXPORT_NAME => {
                    return Err(ProtoError::Protocol(format!(
                        "Option 0x{option:x} not permitted before TLS"
                    )));
                }
                _ => {
                    let _ = c.option_error(
                        option,
                        rep::ERR_TLS_REQD,
                        &format!("Option 0x{option:x} not permitted before TLS"),
                    );
                    if option == opt::ABORT {
                        return Ok(None);
                    }
                }
            }
            continue;
        }
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = server.find(&name) else {
                    return Err(ProtoError::Protocol(format!("export '{name}' not present")));
                };
                if neg.meta_export.as_deref() != Some(name.as_str()) {
                    neg.base_allocation = false;
                    neg.dirty_bitmap = false;
                }
                c.put(&export.size().to_be_bytes())?;
                c.put(&export.flags(neg.structured).to_be_bytes())?;
                if !neg.no_zeroes {
                    c.put(&[0u8; 124])?;
                }
                c.flush()?;
                return Ok(Some((export, neg)));
            }
            opt::ABORT => {
                // QEMU acknowledges, then closes; a client that already hung up is fine.
                let _ = c.option_error(option, rep::ACK, "");
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    c.option_error(option, rep::ERR_INVALID, &unexpected_length(option))?;
                    continue;
                }
                for e in server.exports() {
                    let name = e.config.name.as_bytes();
                    let desc = e.config.description.as_deref().unwrap_or("").as_bytes();
                    let mut d = Vec::with_capacity(4 + name.len() + desc.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name);
                    d.extend_from_slice(desc);
                    c.option_reply(option, rep::SERVER, &d)?;
                }
                c.option_error(option, rep::ACK, "")?;
            }
            opt::STARTTLS if !data.is_empty() => {
                c.option_error(option, rep::ERR_INVALID, &unexpected_length(option))?;
            }
            opt::STARTTLS if c.tls => {
                c.option_error(option, rep::ERR_INVALID, "TLS already enabled")?;
            }
            opt::STARTTLS => {
                c.option_error(option, rep::ERR_POLICY, "TLS not configured")?;
            }
            opt::INFO | opt::GO => match handle_info(server, c, option, &data, &mut neg)? {
                Some(export) if option == opt::GO => return Ok(Some((export, neg))),
                _ => {}
            },
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    c.option_error(option, rep::ERR_INVALID, &unexpected_length(option))?;
                } else if neg.structured {
                    c.option_error(
                        option,
                        rep::ERR_INVALID,
                        "structured reply already negotiated",
                    )?;
                } else {
                    neg.structured = true;
                    c.option_error(option, rep::ACK, "")?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                handle_meta(server, c, option, &data, &mut neg)?;
            }
            _ => {
                c.option_error(
                    option,
                    rep::ERR_UNSUP,
                    &format!("Unsupported option {option} ({})", opt::name(option)),
                )?;
            }
        }
    }
}

/// After the ACK to `NBD_OPT_STARTTLS`: the TLS handshake (QEMU's server side), then the
/// connection continues inside the session.
fn start_tls(
    server: &NbdServer,
    c: &mut Conn,
    creds: &Arc<tls::TlsCreds>,
    authz: Option<&str>,
) -> Result<(), ProtoError> {
    if !c.r.buffer().is_empty() {
        return Err(ProtoError::Protocol(
            "the client sent data before the TLS handshake".into(),
        ));
    }
    let fail = |e: tls::TlsError| ProtoError::Protocol(e.to_string());
    let authz = match authz {
        Some(id) if creds.verify_peer() => {
            let objects = lock(&server.inner.objects)
                .clone()
                .unwrap_or_else(|| Arc::new(tls::Objects::new()));
            Some(objects.authz(id).map_err(fail)?)
        }
        _ => None,
    };
    let io = |source| ProtoError::Io {
        what: "socket",
        source,
    };
    let r = c.sock.try_clone().map_err(io)?;
    let w = c.sock.try_clone().map_err(io)?;
    let socket = c.sock.try_clone().map_err(io)?;
    let mut st = tls::accept(creds, authz, r, w).map_err(fail)?;
    let _ = st.writer.set_socket(socket.as_fd());
    c.r = BufReader::with_capacity(256 << 10, Box::new(st.reader));
    c.w = BufWriter::with_capacity(256 << 10, Box::new(st.writer));
    c.tls = true;
    Ok(())
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`. Returns the export when the reply was `ACK`.
fn handle_info(
    server: &NbdServer,
    c: &mut Conn,
    option: u32,
    data: &[u8],
    neg: &mut Negotiated,
) -> Result<Option<Arc<Export>>, ProtoError> {
    let parsed = (|| -> Result<(String, Vec<u16>), ProtoError> {
        let mut cur = Cursor::new(data, "info request");
        let name = cur.string(proto::MAX_STRING_SIZE)?;
        let n = cur.u16()?;
        if cur.remaining() != usize::from(n) * 2 {
            return Err(ProtoError::Protocol(unexpected_length(option)));
        }
        let mut reqs = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            reqs.push(cur.u16()?);
        }
        Ok((name, reqs))
    })();
    let (name, reqs) = match parsed {
        Ok(p) => p,
        Err(e) => {
            c.option_error(option, rep::ERR_INVALID, &e.to_string())?;
            return Ok(None);
        }
    };
    let Some(export) = server.find(&name) else {
        c.option_error(
            option,
            rep::ERR_UNKNOWN,
            &format!("export '{name}' not present"),
        )?;
        return Ok(None);
    };
    if reqs.contains(&info::NAME) {
        let mut d = info::NAME.to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        c.option_reply(option, rep::INFO, &d)?;
    }
    if reqs.contains(&info::DESCRIPTION) {
        if let Some(desc) = &export.config.description {
            let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(desc.as_bytes());
            c.option_reply(option, rep::INFO, &d)?;
        }
    }
    // QEMU always sends block sizes: minimum 1 (any alignment works: the node handles
    // sub-sector requests), preferred 4096, maximum its buffer size.
    let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&4096u32.to_be_bytes());
    d.extend_from_slice(&proto::MAX_BUFFER_SIZE.to_be_bytes());
    c.option_reply(option, rep::INFO, &d)?;
    let mut d = info::EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&export.size().to_be_bytes());
    d.extend_from_slice(&export.flags(neg.structured).to_be_bytes());
    c.option_reply(option, rep::INFO, &d)?;
    c.option_error(option, rep::ACK, "")?;
    if option == opt::GO && neg.meta_export.as_deref() != Some(name.as_str()) {
        neg.base_allocation = false;
        neg.dirty_bitmap = false;
    }
    Ok(Some(export))
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
fn handle_meta(
    server: &NbdServer,
    c: &mut Conn,
    option: u32,
    data: &[u8],
    neg: &mut Negotiated,
) -> Result<(), ProtoError> {
    let set = option == opt::SET_META_CONTEXT;
    if !neg.structured {
        return c.option_error(
            option,
            rep::ERR_INVALID,
            &format!(
                "request option '{}' when structured reply is not negotiated",
                opt::name(option)
            ),
        );
    }
    let parsed = (|| -> Result<(String, Vec<String>), ProtoError> {
        let mut cur = Cursor::new(data, "meta context request");
        let name = cur.string(proto::MAX_STRING_SIZE)?;
        let n = cur.u32()?;
        if n > MAX_META_QUERIES {
            return Err(ProtoError::Protocol(format!(
                "too many meta context queries ({n})"
            )));
        }
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(cur.string(proto::MAX_STRING_SIZE)?);
        }
        if cur.remaining() != 0 {
            return Err(ProtoError::Protocol(unexpected_length(option)));
        }
        Ok((name, queries))
    })();
    let (name, queries) = match parsed {
        Ok(p) => p,
        Err(e) => return c.option_error(option, rep::ERR_INVALID, &e.to_string()),
    };
    let Some(export) = server.find(&name) else {
        return c.option_error(
            option,
            rep::ERR_UNKNOWN,
            &format!("export '{name}' not present"),
        );
    };
    let bitmap_ctx = export.bitmap_context();
    let mut base = false;
    let mut bitmap = false;
    if queries.is_empty() {
        // An empty query list: LIST shows everything; SET selects nothing.
        if !set {
            base = true;
            bitmap = bitmap_ctx.is_some();
        }
    }
    for q in &queries {
        if q == proto::CONTEXT_BASE_ALLOCATION || (!set && q == "base:") {
            base = true;
        }
        if let Some(ctx) = &bitmap_ctx {
            let listed_prefix = !set && (q == "qemu:" || q == proto::CONTEXT_DIRTY_BITMAP_PREFIX);
            if q == ctx || listed_prefix {
                bitmap = true;
            }
        }
    }
    if base {
        let mut d = META_ID_BASE_ALLOCATION.to_be_bytes().to_vec();
        d.extend_from_slice(proto::CONTEXT_BASE_ALLOCATION.as_bytes());
        c.option_reply(option, rep::META_CONTEXT, &d)?;
    }
    if let (true, Some(ctx)) = (bitmap, &bitmap_ctx) {
        let mut d = META_ID_DIRTY_BITMAP.to_be_bytes().to_vec();
        d.extend_from_slice(ctx.as_bytes());
        c.option_reply(option, rep::META_CONTEXT, &d)?;
    }
    if set {
        neg.meta_export = Some(name);
        neg.base_allocation = base;
        neg.dirty_bitmap = bitmap;
    }
    c.option_error(option, rep::ACK, "")
}

/// QEMU's message for an option whose data does not have the length the option needs.
fn unexpected_length(option: u32) -> String {
    format!("option '{}' has unexpected length", opt::name(option))
}
