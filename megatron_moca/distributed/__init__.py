"""Process groups, megatron parallel state, seeding, and the CPU adaptations (cpu.py)."""
