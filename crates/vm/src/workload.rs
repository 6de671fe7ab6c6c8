//! The reference VM's guest: a deterministic workload run by each vCPU thread.
//!
//! A vCPU's whole state is a handful of integers ([`VcpuState`]), so it migrates as a device
//! section and the destination carries on exactly where the source stopped. Each step writes
//! one page, first filling the vCPU's share of the `fill` region, then rewriting pages of its
//! share of the hot set, chosen by a PRNG. Optionally every N steps it also writes a block to a
//! disk (dirtying the disk's bitmaps) and a line to the serial console.
//!
//! Every page the workload writes describes itself: a header (magic, page number, generation,
//! vCPU) and a body derived from the header. [`check_page`] recomputes it, so RAM can be
//! verified after a migration without keeping a copy — a torn, stale or misplaced page is
//! caught, not just a missing one.

use migration::guest::PAGE_SIZE;

/// The first eight bytes of every page the workload writes ("LMIGPAGE").
pub const PAGE_MAGIC: u64 = 0x4c4d_4947_5041_4745;

/// What the workload does; fixed for the VM's life and given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadConfig {
    /// Bytes at the start of RAM filled with data once, at first boot.
    pub fill: u64,
    /// Bytes (starting at RAM offset 0) that the vCPUs keep rewriting after the fill; 0 means
    /// the workload goes idle after filling.
    pub hot: u64,
    /// Cap on the pages per second all vCPUs together dirty while they run (time a vCPU
    /// spends throttled does not count); 0 means no cap.
    pub dirty_rate: u64,
    /// Write a disk block every this many steps (0: never).
    pub disk_every: u64,
    /// Write a serial console line every this many steps (0: never).
    pub serial_every: u64,
    /// Seed of every vCPU's PRNG.
    pub seed: u64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            fill: 0,
            hot: 0,
            dirty_rate: 0,
            disk_every: 0,
            serial_every: 1 << 20,
            seed: 0x5eed,
        }
    }
}

/// One vCPU's migratable state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u32,
    /// PRNG state (xorshift64*; never zero).
    pub rng: u64,
    /// Steps taken since boot.
    pub steps: u64,
    /// Disk blocks written since boot.
    pub disk_writes: u64,
}

/// What one step did besides writing its page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SideEffect {
    /// Nothing else.
    None,
    /// Write `data` (one page) to the workload disk at `offset` (relative; the caller reduces
    /// it modulo the disk size, page-aligned).
    Disk {
        /// A page-aligned pseudo-random offset.
        offset: u64,
        /// The block's contents.
        data: Box<[u8; PAGE_SIZE as usize]>,
    },
    /// Print a line on the serial console.
    Serial(String),
}

/// One step's page write.
pub struct PageWrite {
    /// RAM offset of the page.
    pub offset: u64,
    /// Its new contents.
    pub data: [u8; PAGE_SIZE as usize],
}

fn xorshift(s: &mut u64) -> u64 {
    let mut x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `page` with the self-describing contents of (`page_no`, `generation`, `vcpu`).
pub fn fill_page(page: &mut [u8; PAGE_SIZE as usize], page_no: u64, generation: u64, vcpu: u32) {
    let header = [PAGE_MAGIC, page_no, generation, u64::from(vcpu)];
    let mut s = splitmix(page_no ^ splitmix(generation ^ (u64::from(vcpu) << 48))) | 1;
    for (i, chunk) in page.chunks_exact_mut(8).enumerate() {
        let w = match header.get(i) {
            Some(h) => *h,
            None => xorshift(&mut s),
        };
        chunk.copy_from_slice(&w.to_le_bytes());
    }
}

/// What [`check_page`] found in a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCheck {
    /// All zero: never written by the workload.
    Zero,
    /// A complete workload page.
    Valid {
        /// Its generation (the writing vCPU's step count).
        generation: u64,
        /// The vCPU that wrote it.
        vcpu: u32,
    },
    /// Anything else: torn, misplaced or foreign data.
    Corrupt,
}

/// Checks that `page`, found at page number `page_no`, is zero or a complete workload page
/// written for that very page number.
pub fn check_page(page: &[u8], page_no: u64) -> PageCheck {
    let word = |i: usize| -> u64 {
        let mut b = [0u8; 8];
        if let Some(s) = page.get(i * 8..i * 8 + 8) {
            b.copy_from_slice(s);
        }
        u64::from_le_bytes(b)
    };
    if page.len() != PAGE_SIZE as usize {
        return PageCheck::Corrupt;
    }
    if word(0) != PAGE_MAGIC {
        return if page.iter().all(|b| *b == 0) {
            PageCheck::Zero
        } else {
            PageCheck::Corrupt
        };
    }
    let (no, generation, vcpu) = (word(1), word(2), word(3));
    let Ok(vcpu) = u32::try_from(vcpu) else {
        return PageCheck::Corrupt;
    };
    if no != page_no {
        return PageCheck::Corrupt;
    }
    let mut expect = [0u8; PAGE_SIZE as usize];
    fill_page(&mut expect, page_no, generation, vcpu);
    if expect[..] == page[..] {
        PageCheck::Valid { generation, vcpu }
    } else {
        PageCheck::Corrupt
    }
}

/// The pages of RAM a vCPU owns, computed from the configuration: its share of the fill
/// region and its share of the hot set. Shares are contiguous and disjoint, so no two vCPUs
/// ever write the same page and the final contents do not depend on thread scheduling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// First page of the vCPU's fill share.
    pub fill_first: u64,
    /// Number of pages it fills.
    pub fill_pages: u64,
    /// First page of its hot-set share.
    pub hot_first: u64,
    /// Number of hot pages it rewrites.
    pub hot_pages: u64,
}

impl Share {
    /// The share of vCPU `id` of `n` in RAM of `ram_pages` pages.
    pub fn of(cfg: &WorkloadConfig, ram_pages: u64, id: u32, n: u32) -> Share {
        let n = u64::from(n.max(1));
        let id = u64::from(id);
        let split = |total: u64| {
            let total = total.min(ram_pages);
            let base = total / n;
            let extra = total % n;
            let first = id * base + id.min(extra);
            let len = base + u64::from(id < extra);
            (first, len)
        };
        let (fill_first, fill_pages) = split(cfg.fill / PAGE_SIZE);
        let (hot_first, hot_pages) = split(cfg.hot / PAGE_SIZE);
        Share {
            fill_first,
            fill_pages,
            hot_first,
            hot_pages,
        }
    }
}

impl VcpuState {
    /// The state of vCPU `id` at boot.
    pub fn boot(cfg: &WorkloadConfig, id: u32) -> Self {
        VcpuState {
            id,
            rng: splitmix(cfg.seed ^ (u64::from(id) << 32)) | 1,
            steps: 0,
            disk_writes: 0,
        }
    }

    /// Whether this vCPU has nothing left to do (filled its share and has no hot pages).
    pub fn is_idle(&self, share: &Share) -> bool {
        self.steps >= share.fill_pages && share.hot_pages == 0
    }

    /// Takes one step: returns the page to write (if any) and a side effect. Deterministic:
    /// the same state and configuration always give the same result.
    pub fn step(&mut self, cfg: &WorkloadConfig, share: &Share) -> (Option<PageWrite>, SideEffect) {
        if self.is_idle(share) {
            return (None, SideEffect::None);
        }
        let page_no = if self.steps < share.fill_pages {
            share.fill_first + self.steps
        } else {
            share.hot_first + xorshift(&mut self.rng) % share.hot_pages
        };
        self.steps += 1;
        let mut data = [0u8; PAGE_SIZE as usize];
        fill_page(&mut data, page_no, self.steps, self.id);
        let write = PageWrite {
            offset: page_no * PAGE_SIZE,
            data,
        };
        let effect = if cfg.disk_every != 0 && self.steps.is_multiple_of(cfg.disk_every) {
            self.disk_writes += 1;
            let offset = (xorshift(&mut self.rng) >> 16) * PAGE_SIZE;
            let mut block = Box::new([0u8; PAGE_SIZE as usize]);
            fill_page(&mut block, offset / PAGE_SIZE, self.disk_writes, self.id);
            SideEffect::Disk {
                offset,
                data: block,
            }
        } else if cfg.serial_every != 0
            && self.id == 0
            && self.steps.is_multiple_of(cfg.serial_every)
        {
            SideEffect::Serial(format!("vcpu{} steps={}\n", self.id, self.steps))
        } else {
            SideEffect::None
        };
        (Some(write), effect)
    }
}

/// The disk writes vCPU `id` makes in its first `writes` disk writes: for each, the block number
/// before reduction to the disk's size, and the write's generation (its `disk_writes` count).
/// Replays only the PRNG (no page is built), so it is cheap for millions of steps.
pub fn disk_history(cfg: &WorkloadConfig, share: &Share, id: u32, writes: u64) -> Vec<(u64, u64)> {
    let mut st = VcpuState::boot(cfg, id);
    let mut out = Vec::new();
    if cfg.disk_every == 0 {
        return out;
    }
    while st.disk_writes < writes && !st.is_idle(share) {
        if st.steps >= share.fill_pages {
            xorshift(&mut st.rng);
        }
        st.steps += 1;
        if st.steps.is_multiple_of(cfg.disk_every) {
            st.disk_writes += 1;
            out.push((xorshift(&mut st.rng) >> 16, st.disk_writes));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_check_themselves() {
        let mut p = [0u8; 4096];
        assert_eq!(check_page(&p, 5), PageCheck::Zero);
        fill_page(&mut p, 5, 77, 2);
        assert_eq!(
            check_page(&p, 5),
            PageCheck::Valid {
                generation: 77,
                vcpu: 2
            }
        );
        assert_eq!(check_page(&p, 6), PageCheck::Corrupt, "misplaced page");
        p[4000] ^= 1;
        assert_eq!(check_page(&p, 5), PageCheck::Corrupt, "torn page");
        let mut q = [0u8; 4096];
        q[100] = 1;
        assert_eq!(check_page(&q, 0), PageCheck::Corrupt);
    }

    #[test]
    fn shares_are_disjoint_and_cover_everything() {
        let cfg = WorkloadConfig {
            fill: 1003 * 4096,
            hot: 10 * 4096,
            ..Default::default()
        };
        let shares: Vec<Share> = (0..3).map(|i| Share::of(&cfg, 2000, i, 3)).collect();
        let mut next_fill = 0;
        let mut next_hot = 0;
        for s in &shares {
            assert_eq!(s.fill_first, next_fill);
            assert_eq!(s.hot_first, next_hot);
            next_fill += s.fill_pages;
            next_hot += s.hot_pages;
        }
        assert_eq!((next_fill, next_hot), (1003, 10));
        // Fill and hot set never exceed RAM.
        let s = Share::of(
            &WorkloadConfig {
                fill: u64::MAX,
                ..cfg
            },
            2000,
            0,
            1,
        );
        assert_eq!(s.fill_pages, 2000);
    }

    #[test]
    fn steps_fill_then_rewrite_hot_pages_deterministically() {
        let cfg = WorkloadConfig {
            fill: 4 * 4096,
            hot: 2 * 4096,
            ..Default::default()
        };
        let share = Share::of(&cfg, 16, 0, 1);
        let mut a = VcpuState::boot(&cfg, 0);
        let mut offsets = vec![];
        for _ in 0..10 {
            let (w, _) = a.step(&cfg, &share);
            offsets.push(w.unwrap().offset / 4096);
        }
        assert_eq!(&offsets[..4], &[0, 1, 2, 3]);
        assert!(offsets[4..].iter().all(|p| *p < 2));
        // Same state, same future: what migration relies on.
        let mut b = a;
        for _ in 0..100 {
            let (wa, ea) = a.step(&cfg, &share);
            let (wb, eb) = b.step(&cfg, &share);
            assert_eq!(wa.unwrap().data, wb.unwrap().data);
            assert_eq!(ea, eb);
        }
    }

    #[test]
    fn idle_after_fill_without_hot_set() {
        let cfg = WorkloadConfig {
            fill: 2 * 4096,
            ..Default::default()
        };
        let share = Share::of(&cfg, 16, 0, 1);
        let mut v = VcpuState::boot(&cfg, 0);
        assert!(v.step(&cfg, &share).0.is_some());
        assert!(v.step(&cfg, &share).0.is_some());
        assert!(v.is_idle(&share));
        assert!(v.step(&cfg, &share).0.is_none());
    }

    #[test]
    fn disk_history_replays_the_disk_writes() {
        let cfg = WorkloadConfig {
            fill: 8 * 4096,
            hot: 4 * 4096,
            disk_every: 3,
            ..Default::default()
        };
        let share = Share::of(&cfg, 64, 1, 2);
        let mut v = VcpuState::boot(&cfg, 1);
        let mut want = Vec::new();
        while v.disk_writes < 20 {
            if let (_, SideEffect::Disk { offset, data }) = v.step(&cfg, &share) {
                let mut page = [0u8; 4096];
                fill_page(&mut page, offset / 4096, v.disk_writes, 1);
                assert_eq!(page[..], data[..]);
                want.push((offset / 4096, v.disk_writes));
            }
        }
        assert_eq!(disk_history(&cfg, &share, 1, 20), want);
    }

    #[test]
    fn side_effects_follow_the_schedule() {
        let cfg = WorkloadConfig {
            hot: 4096,
            disk_every: 3,
            serial_every: 2,
            ..Default::default()
        };
        let share = Share::of(&cfg, 16, 0, 1);
        let mut v = VcpuState::boot(&cfg, 0);
        let effects: Vec<SideEffect> = (0..6).map(|_| v.step(&cfg, &share).1).collect();
        assert!(matches!(effects[1], SideEffect::Serial(ref s) if s == "vcpu0 steps=2\n"));
        assert!(matches!(effects[2], SideEffect::Disk { .. }));
        assert!(matches!(effects[5], SideEffect::Disk { .. }));
        assert_eq!(v.disk_writes, 2);
    }
}
