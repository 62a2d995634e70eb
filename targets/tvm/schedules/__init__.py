"""Default TIR schedules for the CPU targets: `base` (the public `ScheduleRule` base, the helpers
rules share and the rule order), one module per rule family (`nchwc`: channel-blocked convs and
windows, `winograd`), and the int8 rules per ISA (`int8_x86`: AVX-512 VNNI / AVX2,
`int8_arm64`: sdot/smmla)."""
