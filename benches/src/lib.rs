//! Benchmarks for understudy. The criterion benches are in `benches/`; the
//! end-to-end comparison with rsync over ssh is `e2e.py` (see `README.md`).
