"""medseg plan: dataset fingerprint, planning rules, probe and planned configs."""
