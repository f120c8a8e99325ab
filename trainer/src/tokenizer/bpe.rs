//! Byte-level BPE: GPT-2's byte <-> character map, and the merging of one word's bytes by rank.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// GPT-2's `bytes_to_unicode`: the character that spells each byte in a byte-level vocabulary.
/// Printable Latin-1 bytes spell themselves; the other 68 take U+0100.. in byte order.
pub(crate) fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(b)
        } else {
            let c = next;
            next += 1;
            c
        };
        map[usize::from(b)] = char::from_u32(code).unwrap_or('\0');
    }
    map
}

/// Highest code point [`byte_to_char`] uses, plus one.
pub(crate) const SPELLING_END: usize = 256 + 68;

/// The inverse of [`byte_to_char`], indexed by code point below [`SPELLING_END`].
pub(crate) fn char_to_byte_table(map: &[char; 256]) -> [Option<u8>; SPELLING_END] {
    let mut table = [None; SPELLING_END];
    for (b, &c) in map.iter().enumerate() {
        table[c as usize] = u8::try_from(b).ok();
    }
    table
}

/// The byte a vocabulary character spells, if any.
#[inline]
pub(crate) fn char_to_byte(table: &[Option<u8>; SPELLING_END], c: char) -> Option<u8> {
    table.get(c as usize).copied().flatten()
}

/// A small, fast, non-cryptographic hasher (FxHash's multiply-rotate) for the merge table and the
/// word cache: their keys come from the model file and the text being tokenized, not from a
/// network peer choosing collisions.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

pub(crate) type FxBuild = BuildHasherDefault<FxHasher>;
pub(crate) type FxHashMap<K, V> = HashMap<K, V, FxBuild>;

/// Words longer than this (in bytes) are merged with a heap instead of rescanning every pair.
const SCAN_LIMIT: usize = 48;

/// The merge table: which adjacent pair of tokens merges, at which rank, into which token.
#[derive(Debug, Clone)]
pub(crate) struct Bpe {
    /// The token of each single byte (its vocabulary spelling), or the unknown token, or none.
    pub(crate) byte_token: [Option<u32>; 256],
    /// (left, right) -> (rank, merged token). Lower rank merges first.
    pub(crate) merges: FxHashMap<(u32, u32), (u32, u32)>,
}

impl Bpe {
    #[inline]
    fn merge_of(&self, left: u32, right: u32) -> Option<(u32, u32)> {
        self.merges.get(&(left, right)).copied()
    }

    /// Appends the tokens of one word to `out`: its bytes as single-byte tokens, then, again and
    /// again, the adjacent pair of lowest rank (leftmost on a tie) merged, until no pair merges.
    /// This is the order Hugging Face `tokenizers` applies merges in. A byte with no token is
    /// dropped (no unknown token) or becomes the unknown token.
    pub(crate) fn encode_word(&self, word: &[u8], out: &mut Vec<u32>) {
        let start = out.len();
        out.extend(word.iter().filter_map(|&b| self.byte_token[usize::from(b)]));
        if out.len() - start > SCAN_LIMIT {
            let merged = self.merge_heap(&out[start..]);
            out.truncate(start);
            out.extend(merged);
        } else {
            self.merge_scan(out, start);
        }
    }

    /// Quadratic merging in place, in `symbols[start..]`; fastest for ordinary words.
    fn merge_scan(&self, symbols: &mut Vec<u32>, start: usize) {
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in start..symbols.len().saturating_sub(1) {
                if let Some((rank, new)) = self.merge_of(symbols[i], symbols[i + 1])
                    && best.is_none_or(|(r, _, _)| rank < r)
                {
                    best = Some((rank, i, new));
                }
            }
            let Some((_, i, new)) = best else { return };
            symbols[i] = new;
            symbols.remove(i + 1);
        }
    }

    /// Heap-driven merging over a linked list of symbols; for long words (whitespace runs, rows of
    /// `=`), where rescanning would be quadratic.
    pub(crate) fn merge_heap(&self, initial: &[u32]) -> Vec<u32> {
        const NONE: usize = usize::MAX;
        let n = initial.len();
        let mut id = initial.to_vec();
        let mut alive = vec![true; n];
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        if n > 0 {
            prev[0] = NONE;
        }
        let mut next: Vec<usize> = (1..=n).collect();
        if n > 0 {
            next[n - 1] = NONE;
        }
        let mut heap = BinaryHeap::new();
        for i in 0..n.saturating_sub(1) {
            if let Some((rank, _)) = self.merge_of(id[i], id[i + 1]) {
                heap.push(Reverse((rank, i)));
            }
        }
        while let Some(Reverse((rank, i))) = heap.pop() {
            if !alive[i] || next[i] == NONE {
                continue;
            }
            let j = next[i];
            // Ranks are unique per pair, so a matching rank means the pair is still there.
            let Some((r, new)) = self.merge_of(id[i], id[j]) else {
                continue;
            };
            if r != rank {
                continue;
            }
            id[i] = new;
            alive[j] = false;
            next[i] = next[j];
            if next[j] != NONE {
                prev[next[j]] = i;
            }
            if prev[i] != NONE
                && let Some((r, _)) = self.merge_of(id[prev[i]], id[i])
            {
                heap.push(Reverse((r, prev[i])));
            }
            if next[i] != NONE
                && let Some((r, _)) = self.merge_of(id[i], id[next[i]])
            {
                heap.push(Reverse((r, i)));
            }
        }
        (0..n).filter(|&i| alive[i]).map(|i| id[i]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_gpt2s() {
        let map = byte_to_char();
        assert_eq!(map[usize::from(b' ')], 'Ġ');
        assert_eq!(map[usize::from(b'\n')], 'Ċ');
        assert_eq!(map[usize::from(b'a')], 'a');
        assert_eq!(map[0], 'Ā');
        assert_eq!(map[0xAD], 'Ń');
        let table = char_to_byte_table(&map);
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            assert!(seen.insert(map[usize::from(b)]));
            assert!((map[usize::from(b)] as usize) < SPELLING_END);
            assert_eq!(char_to_byte(&table, map[usize::from(b)]), Some(b));
        }
        assert_eq!(char_to_byte(&table, 'é'), Some(0xE9));
        assert_eq!(char_to_byte(&table, 'Ġ'), Some(b' '));
        assert_eq!(char_to_byte(&table, '日'), None);
    }

    /// A merge table over byte tokens 0..4 with random pairs and unique ranks.
    fn random_bpe(pairs: &[(u32, u32)]) -> Bpe {
        let mut byte_token = [None; 256];
        for (b, t) in byte_token.iter_mut().enumerate().take(4) {
            *t = Some(b as u32);
        }
        let mut merges = FxHashMap::default();
        let mut next = 4u32;
        for (rank, &(l, r)) in pairs.iter().enumerate() {
            if l < next && r < next && !merges.contains_key(&(l, r)) {
                merges.insert((l, r), (rank as u32, next));
                next += 1;
            }
        }
        Bpe { byte_token, merges }
    }

    proptest::proptest! {
        #[test]
        fn heap_and_scan_agree(
            pairs in proptest::collection::vec((0u32..12, 0u32..12), 0..40),
            word in proptest::collection::vec(0u8..4, 0..120),
        ) {
            let bpe = random_bpe(&pairs);
            let initial: Vec<u32> = word.iter().map(|&b| u32::from(b)).collect();
            let mut scanned = initial.clone();
            bpe.merge_scan(&mut scanned, 0);
            proptest::prop_assert_eq!(bpe.merge_heap(&initial), scanned);
        }
    }
}
