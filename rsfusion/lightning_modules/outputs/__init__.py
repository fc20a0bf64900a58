"""What runs write: run folders and checkpoints, the callbacks every Trainer gets, classification maps
(committed as sets), reports and W&B media, faster CPU prediction."""
