"""Networks and losses: `encoder` (the two-branch PCL encoder and its presets),
`losses` (the weighted NT-Xent losses)."""
