"""The patching methods (private: import from the top level): activation patching, path
patching and ablation caches, each planning its passes and running them on `_core`."""
