"""nuScenes reader, synthetic drive generator, transforms, collate and the Lightning data module."""
