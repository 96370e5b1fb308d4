//! black-box tests live in integration/
