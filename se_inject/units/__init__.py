"""The units se_inject inserts: the SE unit, its gates, and the fixed scale a pruned unit leaves."""
