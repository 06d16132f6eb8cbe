"""The vocabulary-parallel forms of the losses (lm_head rows sharded over a process group): each rank computes
its columns' partial statistics, the ranks exchange O(tokens) floats, and the single-process finishing runs."""
