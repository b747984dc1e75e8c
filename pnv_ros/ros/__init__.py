"""ROS 2 plumbing around the LoopClosureDetector (imports rclpy)."""
