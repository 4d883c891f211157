"""Tasks as data: task files (JSON Lines or CSV, and MIB's schema), the shipped tasks, and their
tokenization for any model (private: the names are exported by the package)."""
