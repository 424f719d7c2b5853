"""The image experiment: train a class-conditional U-Net, then measure when it decides its class."""
