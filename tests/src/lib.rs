//! Real-process test harness.
