"""Camera, LiDAR, radar and GPS fusion in bird's-eye view."""
__version__ = "0.1.0"
