"""Tasks built on the public API (private: import from `transformer_lens_patching.ioi`)."""
